use std::process::ExitCode;

fn main() -> ExitCode {
    fleetwatch::cli::main()
}
