//! The flowfuse command-line tool: train a flow, evaluate and sample a saved one, and report
//! what this machine can run. Errors are one line on stderr and a non-zero exit status.

mod args;
mod bench;
mod device;
mod figures;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A bug must not print a backtrace at a user: one line, then a distinct exit status.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned());
        eprintln!(
            "error: internal error: {}",
            msg.unwrap_or_else(|| "panic".into())
        );
    }));
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(|| run::run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(101),
    }
}
