fn main() {
    println!("cargo:rerun-if-changed=../migrations/orders");
    println!("cargo:rerun-if-changed=../migrations/payments");
    println!("cargo:rerun-if-changed=../migrations/inventory");
}
