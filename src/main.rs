//! The `shimcheck` binary: parse the command line, run the command, map the outcome to an
//! exit status (0 no finding, 1 at least one finding, 2 usage or runtime error). A closed
//! stdout (`| head`) ends quietly.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use clap::Parser;
use shimcheck::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Memory back to the kernel as soon as it is freed, except in a watch, which keeps it for
    // its next sample (glibc's own rule): every fresh page of a sample costs a fault, and a
    // watch samples every few seconds. `serve`, an agent on every node sampling every 15 s,
    // stays frugal.
    let watching = matches!(&cli.command, Command::Ports(args) if args.watch);
    if !watching {
        fixed_mmap_threshold();
    }
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut err = io::stderr();
    let result = match &cli.command {
        Command::Ports(args) => shimcheck::run_ports(args, &mut out, &mut err),
        Command::Snapshot(args) => shimcheck::run_snapshot(args, &mut out, &mut err),
        Command::Serve(args) => shimcheck::serve::run(args, &mut err),
        Command::Completion { shell } => shimcheck::run_completion(*shell, &mut out),
        Command::Man => shimcheck::run_man(&mut out),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "shimcheck: error: {e:#}");
            if let Some(limit) = out_of_fds(&e) {
                let _ = writeln!(
                    err,
                    "shimcheck: hint: shimcheck ran out of file descriptors (its open-file \
                     limit is {limit}); it needs about 16 plus 2 per thread: raise the limit \
                     (`ulimit -n 1024`, LimitNOFILE= in a unit)"
                );
            }
            ExitCode::from(2)
        }
    }
}

/// This process's soft open-file limit, when `e` came from running out of descriptors
/// (EMFILE): a message about the file it failed to open would send the operator the wrong way.
fn out_of_fds(e: &anyhow::Error) -> Option<u64> {
    let emfile = e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EMFILE))
    });
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    emfile.then_some(limit).flatten()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB); a
/// program's large vectors then come from the heap and stay resident when freed. A fixed
/// threshold keeps them mmapped, returned to the kernel when freed: a lower peak for a one-shot
/// look (26 against 34 MiB at 131,000 sockets), and `serve` at 120,000 sockets holds 28 MiB
/// between samples instead of 52 (benches/serve.sh). A watch does without it: a churning
/// sample at 131,000 sockets took 8,500 page faults and 59 ms of CPU with it, 80 faults and
/// 41–47 ms without (`/usr/bin/time`, later samples of `benches/ports.sh`'s watch).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
    // starts. A refusal (0) leaves glibc's default, which is merely less frugal.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}
