fn main() {
    // Embedded migrations: rebuild when one is added.
    println!("cargo:rerun-if-changed=migrations");
}
