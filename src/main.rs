//! The `shimcheck` binary: parse the command line, run the command, map the outcome to an
//! exit status (0 no finding, 1 at least one finding, 2 usage or runtime error). A closed
//! stdout (`| head`) ends quietly.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use clap::Parser;
use shimcheck::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut err = io::stderr();
    let result = match &cli.command {
        Command::Ports(args) => shimcheck::run_ports(args, &mut out, &mut err),
        Command::Snapshot(args) => shimcheck::run_snapshot(args, &mut out, &mut err),
        Command::Serve(args) => shimcheck::serve::run(args, &mut err),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "shimcheck: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
