//! The `edgec` command line.

use clap::{Parser, Subcommand};
use edgec::interp::Interpreter;
use edgec::ir::text::render;
use edgec::passes::PassManager;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "edgec", version, about = "Ahead-of-time compiler for transformer models on edge devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's IR (after import and shape inference, or after passes).
    Inspect {
        /// The ONNX model (external-data files are read from its folder).
        model: PathBuf,
        /// Comma-separated pass pipeline to run first, e.g. `default` or
        /// `shape-inference,const-fold,dce`. Without it, the IR as imported.
        #[arg(long)]
        passes: Option<String>,
        /// Print the IR after this pass of the pipeline (repeatable; `all` prints
        /// after every pass). Without it, only the final IR is printed.
        #[arg(long)]
        after: Vec<String>,
    },
    /// Run a model with the reference interpreter and write each output as NAME.npy.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each graph input).
        #[arg(long = "input", short = 'i', value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Folder for the output .npy files (created if missing).
        #[arg(long, default_value = ".")]
        output_dir: PathBuf,
        /// Pass pipeline to run before interpreting (`none` runs the graph as imported).
        #[arg(long, default_value = "default")]
        passes: String,
    },
}

fn pipeline(list: &str) -> edgec::Result<PassManager> {
    PassManager::parse(if list == "none" { "" } else { list })
}

/// A file name for an output: ONNX value names may contain '/' and ':'.
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

fn inspect(model: &Path, passes: Option<String>, after: Vec<String>) -> Result<(), String> {
    let mut g = edgec::onnx::load_model(model).map_err(|e| e.to_string())?;
    let Some(list) = passes else {
        print!("{}", render(&g));
        return Ok(());
    };
    let pm = pipeline(&list).map_err(|e| e.to_string())?;
    for a in &after {
        if a != "all" && !pm.names().contains(&a.as_str()) {
            return Err(format!("--after {a}: the pipeline has no such pass ({})", pm.names().join(", ")));
        }
    }
    let mut printed_last = false;
    pm.run(&mut g, &mut |name, stats, g| {
        printed_last = after.iter().any(|a| a == "all" || a == name);
        if printed_last {
            println!("# after {name} (changed {})", stats.changed);
            print!("{}", render(g));
        }
    })
    .map_err(|e| e.to_string())?;
    if !printed_last {
        print!("{}", render(&g));
    }
    Ok(())
}

fn run(model: &Path, inputs: Vec<String>, output_dir: PathBuf, passes: String) -> Result<(), String> {
    let t0 = Instant::now();
    let mut g = edgec::onnx::load_model(model).map_err(|e| e.to_string())?;
    pipeline(&passes).and_then(|pm| pm.run(&mut g, &mut |_, _, _| {})).map_err(|e| e.to_string())?;
    let load_time = t0.elapsed();
    let mut feeds = Vec::new();
    for spec in inputs {
        let (name, file) = spec.split_once('=').ok_or_else(|| format!("--input '{spec}' must be NAME=FILE.npy"))?;
        feeds.push((name.to_string(), edgec::npy::read_npy(Path::new(file))?));
    }
    let t1 = Instant::now();
    let interp = Interpreter::new(&g).map_err(|e| e.to_string())?;
    let outputs = interp.run(&feeds).map_err(|e| e.to_string())?;
    let run_time = t1.elapsed();
    std::fs::create_dir_all(&output_dir).map_err(|e| format!("cannot create {}: {e}", output_dir.display()))?;
    for (name, t) in &outputs {
        let path = output_dir.join(format!("{}.npy", file_stem(name)));
        edgec::npy::write_npy(&path, t)?;
        println!("{name}: {}{:?} -> {}", t.dtype(), t.shape, path.display());
    }
    eprintln!(
        "load+passes {:.1} ms, interpreter {:.1} ms",
        load_time.as_secs_f64() * 1e3,
        run_time.as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { model, passes, after } => inspect(&model, passes, after),
        Command::Run { model, inputs, output_dir, passes } => run(&model, inputs, output_dir, passes),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
