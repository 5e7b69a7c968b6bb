use std::process::ExitCode;

/// glibc's allocator cost the hub about a quarter of its CPU under load (many small,
/// short-lived allocations across threads); mimalloc is markedly cheaper there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    fleetwatch::cli::main()
}
