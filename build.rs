//! Rebuild when a migration is added: `sqlx::migrate!` embeds the migrations directory at
//! compile time, and Cargo does not otherwise notice a new file in it (an incremental build
//! would run the old set).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
