//! The `pe-clip` command-line tool.

fn main() -> std::process::ExitCode {
    pe_clip::cli::main()
}
