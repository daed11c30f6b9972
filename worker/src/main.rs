//! `tessera-worker`: one training rank. See `tessera_worker::cli` for what it does.

fn main() -> std::process::ExitCode {
    tessera_worker::cli::main(std::env::args_os())
}
