//! The `niso` binary: parse arguments, run, map the outcome to an exit code
//! (0 success, 1 "ran fine but the answer is no", 2 error).
fn main() -> std::process::ExitCode {
    niso::cli::main()
}
