#!/usr/bin/env python3
"""Checks docker-compose.yml against the workspace: every service that runs
Skald names a binary the workspace builds, and every environment variable it
sets is one the binaries read (a clap `env = "..."` attribute, or a variable
read with std::env). Run from the repository root; exits 1 on a mismatch."""
import pathlib
import re
import subprocess
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
config = subprocess.run(
    ["docker-compose", "-f", str(root / "docker-compose.yml"), "config"],
    check=True, capture_output=True, text=True,
).stdout
services = yaml.safe_load(config)["services"]

binaries = set()
for manifest in root.glob("*/Cargo.toml"):
    binaries.update(re.findall(r'\[\[bin\]\]\s*\nname\s*=\s*"([^"]+)"', manifest.read_text()))
env_read = set()
for src in root.glob("*/src/**/*.rs"):
    text = src.read_text()
    env_read.update(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', text))
    env_read.update(re.findall(r'env::var(?:_os)?\("([A-Z0-9_]+)"\)', text))
env_read.add("RUST_LOG")  # read by tracing-subscriber's EnvFilter

problems = []
skald_services = 0
for name, svc in services.items():
    image = svc.get("image", "")
    if not image.startswith("skald"):
        continue
    skald_services += 1
    command = svc.get("command") or []
    if isinstance(command, str):
        command = command.split()
    if not command or command[0] not in binaries:
        problems.append(f"{name}: command {command!r} does not start a workspace binary {sorted(binaries)}")
    for var in (svc.get("environment") or {}):
        if var not in env_read:
            problems.append(f"{name}: sets {var}, which no binary reads")
if skald_services == 0:
    problems.append("no service runs a skald image")
for p in problems:
    print("compose:", p)
if problems:
    sys.exit(1)
print(f"compose: {skald_services} Skald services checked against {len(binaries)} binaries and {len(env_read)} variables")
