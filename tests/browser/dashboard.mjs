// Drives Skald's dashboard in Debian's headless chromium (playwright-core,
// no downloaded browser). Run by tests/tests/dashboard.rs with:
//   SKALD_URL        the coordinator, e.g. http://127.0.0.1:8080
//   SKALD_SAGA_ID    a STUCK saga
//   SKALD_TOKEN      the coordinator's ADMIN_TOKEN
//   SKALD_SCREENSHOT where to save a screenshot of the list (PNG); one of
//                    the saga page goes beside it, as NAME-saga.png
//   CHROMIUM         the browser (default /usr/bin/chromium)
// Exits 0 when every step passed; prints what failed otherwise.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const need = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = need("SKALD_URL");
const sagaId = need("SKALD_SAGA_ID");
const token = need("SKALD_TOKEN");
const screenshot = need("SKALD_SCREENSHOT");
const step = (what) => console.log(`dashboard: ${what}`);

const profile = mkdtempSync(join(tmpdir(), "skald-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1360, height: 900 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const problems = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // The wrong token's 401 is expected; any other error in the console is not.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().includes("status of 401")) problems.push(`console error: ${m.text()}`);
  });

  step("the saga list, with the STUCK saga and its counter");
  await page.goto(`${base}/#/`);
  const row = page.locator(`#saga-table tr[data-saga="${sagaId}"]`);
  await row.waitFor();
  await page.locator(".counter.stuck .n", { hasText: "1" }).waitFor();

  step("filtering by status");
  await page.selectOption("#f-status", "STUCK");
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForFunction(() => location.hash.includes("status=STUCK"));
  await row.waitFor();
  const shown = await page.locator("#saga-table tbody tr").count();
  if (shown !== 1) throw new Error(`status=STUCK shows ${shown} rows, not 1`);

  step("the saga page: status and timeline");
  await row.getByRole("link").click();
  await page.locator("#saga-status", { hasText: "STUCK" }).waitFor();
  await page.locator(".timeline li", { hasText: "charge_payment" }).first().waitFor();
  await page.locator(".timeline", { hasText: "compensation" }).waitFor();

  step("Retry with a wrong token: 401 is shown, nothing happens");
  await page.click("#retry");
  await page.locator("#token-dialog[open]").waitFor();
  await page.fill("#token-input", "not-the-token");
  await page.click("#token-ok");
  await page.locator("#notice.error", { hasText: "401" }).waitFor();
  await page.locator("#saga-status", { hasText: "STUCK" }).waitFor();

  step("Retry with the right token: the status moves");
  await page.click("#retry");
  await page.locator("#token-dialog[open]").waitFor();
  await page.fill("#token-input", token);
  await page.click("#token-ok");
  await page.locator("#notice.ok").waitFor();
  await page.waitForFunction(() => {
    const s = document.querySelector("#saga-status");
    return s && !s.textContent.includes("STUCK");
  });
  step(`status now ${await page.locator("#saga-status").textContent()}`);
  await page.locator("#saga-status", { hasText: "COMPENSATED" }).waitFor({ timeout: 30_000 });
  await page.locator("#token-state", { hasText: "admin token set" }).waitFor();
  await page.getByRole("button", { name: "Search the dead-letter queue" }).click();
  await page.locator("#saga-dead-letters", { hasText: "None." }).waitFor();
  await page.screenshot({ path: screenshot.replace(/\.png$/, "") + "-saga.png", fullPage: true });

  step("the dead-letter queue");
  await page.click('nav a[data-view="dead-letters"]');
  await page.locator("#dead-letter-table tbody tr").first().waitFor();
  const reason = await page.locator("#dead-letter-table tbody tr td").nth(2).textContent();
  if (!reason.includes("<script>")) throw new Error(`the reason is not shown as text: ${reason}`);

  step("the participants panel");
  await page.click('nav a[data-view="participants"]');
  await page.locator('#participants-table tr[data-queue="skald.payment.commands"]').waitFor();

  step("the STUCK list is empty now");
  await page.click('nav a[data-view="attention"]');
  await page.getByText("No STUCK saga.").waitFor();

  step("screenshot of the saga list");
  await page.goto(`${base}/#/`);
  await row.waitFor();
  await page.locator(".counter.stuck .n", { hasText: "0" }).waitFor();
  await page.screenshot({ path: screenshot, fullPage: true });
  if (await page.evaluate(() => window.__xss === true)) problems.push("a value from the API ran as script");
} catch (e) {
  problems.push(e.stack || String(e));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
if (problems.length) {
  console.error("dashboard: FAILED\n" + problems.join("\n"));
  process.exit(1);
}
step("all passed");
