use anyhow::Context;
use clap::Parser;
use herald::app;
use herald::cli::{Cli, Command};
use herald::config::Config;

// glibc's allocator took a quarter of the process's CPU under webhook load (perf:
// _int_malloc, unlink_chunk, malloc_consolidate), mostly on short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the trace exporter sends from a task on it.
    let init = {
        let _rt = runtime.enter();
        herald::telemetry::init(&cfg.log, &cfg.telemetry)
    };
    if let Err(e) = init {
        eprintln!("herald: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = runtime.block_on(async {
        let r = run(cli.command, cfg).await;
        herald::telemetry::shutdown().await;
        r
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, cfg: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            app::migrate(&cfg).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Serve { roles } => {
            let roles = app::parse_roles(roles.as_deref())?;
            herald::telemetry::metrics();
            let running = app::start(cfg, roles).await.context("starting roles")?;
            app::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        Command::Demo(args) => herald::demo::run(cfg, args).await,
        Command::Ops { command } => herald::ops::run(&cfg, command).await,
    }
}
