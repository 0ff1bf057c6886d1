//! The subcommands.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use serde_json::{Value, json};

use crate::args::{BenchArgs, Cli, Command, EvalArgs, SampleArgs, TrainArgs};
use crate::bench::{Sizes, run_suite};
use crate::device::{OnBackend, Resolved, dispatch, resolve};
use crate::figures::{cnf_figures, flow_figures};
use flowfuse::backend::cuda;
use flowfuse::backend::grid::Precision;
use flowfuse::cnf::{Cnf, CnfConfig, Objective, ScaledCnf};
use flowfuse::flows::actnorm::ActNorm;
use flowfuse::flows::presets::{Family, FlowSpec, build};
use flowfuse::nn::Activation;
use flowfuse::ops::optim::AdamHyper;
use flowfuse::ops::rk45::{ProbeKind, TraceSpec};
use flowfuse::train::data::{DataSource, Standardizer, train_test_split};
use flowfuse::train::model::{Model, load, save_cnf, save_flow};
use flowfuse::train::trainer::{TrainConfig, dataset_nll, train};
use flowfuse::train::{csv, npy};
use flowfuse::{Backend, Error, Result, Rng, Shaped, Tensor};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => {
            let device = a.device.clone();
            let report = dispatch(&device, TrainJob(*a))?;
            println!("{}", serde_json::to_string(&report).expect("json"));
            Ok(())
        }
        Command::Eval(a) => {
            let device = a.device.clone();
            let report = dispatch(&device, EvalJob(a))?;
            println!("{}", serde_json::to_string(&report).expect("json"));
            Ok(())
        }
        Command::Sample(a) => {
            let device = a.device.clone();
            let report = dispatch(&device, SampleJob(a))?;
            println!("{}", serde_json::to_string(&report).expect("json"));
            Ok(())
        }
        Command::Bench(a) => {
            for line in bench(a)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Kernels => {
            print!("{}", flowfuse::backend::cuda::images::REPORT);
            Ok(())
        }
        Command::Info => {
            println!("{}", serde_json::to_string_pretty(&info()).expect("json"));
            Ok(())
        }
    }
}

fn info() -> Value {
    let avail = cuda::availability();
    let gpu = if avail.devices > 0 {
        "usable".to_string()
    } else {
        format!("not usable: {}", avail.reason)
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backends": ["cpu", "cuda"],
        "cpu_threads": rayon_threads(),
        "cuda_driver": avail.driver,
        "cuda_devices": avail.devices,
        "gpu": gpu,
        "nvrtc_runtime": avail.nvrtc,
        "kernel_build": flowfuse::backend::cuda::images::BUILD_MODE,
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_hidden(s: &str) -> Result<Vec<usize>> {
    let widths: Vec<usize> = s
        .split(',')
        .map(|w| {
            w.trim()
                .parse::<usize>()
                .map_err(|_| Error::invalid(format!("--hidden: '{w}' is not a positive integer")))
        })
        .collect::<Result<_>>()?;
    if widths.is_empty() || widths.contains(&0) {
        return Err(Error::invalid(
            "--hidden needs positive widths, e.g. 64 or 128,128",
        ));
    }
    Ok(widths)
}

/// Loads the data set named on the command line and splits it.
fn load_split(
    data: &str,
    samples: usize,
    test_fraction: f64,
    rng: &mut Rng,
) -> Result<(DataSource, Tensor, Tensor)> {
    let source = DataSource::parse(data)?;
    let all = source.load(samples, rng)?;
    let (train, test) = train_test_split(&all, test_fraction, rng)?;
    Ok((source, train, test))
}

struct TrainJob(TrainArgs);

impl OnBackend for TrainJob {
    type Out = Value;

    fn run<B: Backend>(self, b: &B) -> Result<Value> {
        let a = self.0;
        if a.model == "cnf" {
            return train_cnf(b, a);
        }
        let family = Family::parse(&a.model)?;
        let mut rng = Rng::new(a.seed);
        let (source, train_data, test_data) =
            load_split(&a.data, a.samples, a.test_fraction, &mut rng)?;
        let dim = train_data.cols();
        let mut spec = FlowSpec::new(family, dim);
        if let Some(l) = a.layers {
            spec.layers = l;
        }
        if let Some(h) = &a.hidden {
            spec.hidden = parse_hidden(h)?;
        }
        if let Some(act) = &a.activation {
            spec.act = Activation::parse(act)?;
        }
        let mut flow = build(b, &spec, &mut rng)?;
        if !a.no_standardize {
            // A fixed last layer maps standardised values to data units, so the model is
            // trained and evaluated on the raw data and reports log-densities in its units.
            let st = Standardizer::fit(&train_data)?;
            flow.push(Box::new(ActNorm::standardization(b, &st.mean, &st.std)?))?;
        }
        let init_rows = train_data.slice_rows(0, 4096);
        flow.init_from_data(b, &b.upload(&init_rows)?)?;

        std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
        let metrics_path = a.out.join("metrics.jsonl");
        let mut metrics =
            BufWriter::new(File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?);
        let cfg = TrainConfig {
            steps: a.steps.unwrap_or(default_steps(family)),
            batch: a.batch,
            adam: AdamHyper {
                lr: a.lr.unwrap_or(2e-3),
                weight_decay: a.weight_decay,
                ..AdamHyper::default()
            },
            clip_norm: (a.clip > 0.0).then_some(a.clip),
            seed: a.seed,
            eval_every: a.eval_every,
            progress: !a.quiet,
            ..TrainConfig::default()
        };
        let report = train(
            &mut flow,
            b,
            &train_data,
            &test_data,
            &cfg,
            Some(&mut metrics),
        )?;
        drop(metrics);

        let model_path = a.out.join("model.safetensors");
        let mut notes = BTreeMap::new();
        notes.insert("data".into(), source.to_string());
        notes.insert("steps".into(), cfg.steps.to_string());
        notes.insert("test_nll".into(), format!("{:.6}", report.test_nll));
        save_flow(&model_path, b, &flow, family.name(), notes)?;

        let figures = if dim == 2 && !a.no_figures {
            flow_figures(b, &flow, family.name(), &test_data, &a.out, a.seed)?
        } else {
            vec![]
        };
        Ok(json!({
            "model": family.name(),
            "data": source.to_string(),
            "device": b.name(),
            "dim": dim,
            "layers": spec.layers,
            "hidden": spec.hidden,
            "params": flow.params().iter().map(|p| p.len()).sum::<usize>(),
            "train_nll": report.train_nll,
            "test_nll": report.test_nll,
            "steps": report.steps,
            "batch": cfg.batch,
            "seconds": report.seconds,
            "samples_per_second": report.samples_per_second,
            "out": a.out.display().to_string(),
            "figures": figures.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }))
    }
}

fn default_steps(family: Family) -> usize {
    match family {
        Family::Iaf => 2000,
        _ => 3000,
    }
}

struct EvalJob(EvalArgs);

impl OnBackend for EvalJob {
    type Out = Value;

    fn run<B: Backend>(self, b: &B) -> Result<Value> {
        let a = self.0;
        let (model, meta) = load(&a.model, b)?;
        let mut rng = Rng::new(a.seed);
        let source = DataSource::parse(&a.data)?;
        let data = source.load(a.samples, &mut rng)?;
        if data.cols() != meta.dim {
            return Err(Error::shape(
                "eval",
                format!("data with {} columns (the model's dimension)", meta.dim),
                data.cols(),
            ));
        }
        let nll = match &model {
            Model::Flow(f) => dataset_nll(f, b, &data, 8192)?,
            Model::Cnf(c) => dataset_nll(c, b, &data, 8192)?,
        };
        Ok(
            json!({ "model": meta.family, "data": source.to_string(), "rows": data.rows(), "nll": nll, "device": b.name() }),
        )
    }
}

struct SampleJob(SampleArgs);

impl OnBackend for SampleJob {
    type Out = Value;

    fn run<B: Backend>(self, b: &B) -> Result<Value> {
        let a = self.0;
        if a.n == 0 {
            return Err(Error::invalid("-n must be positive"));
        }
        let writer = output_writer(&a.out)?;
        let (model, meta) = load(&a.model, b)?;
        let mut rng = Rng::new(a.seed);
        let x = match &model {
            Model::Flow(f) => f.sample(b, a.n, &mut rng)?,
            Model::Cnf(c) => c.sample(b, a.n, &mut rng)?.0,
        };
        writer(&a.out, &b.download(&x)?)?;
        Ok(
            json!({ "model": meta.family, "samples": a.n, "out": a.out.display().to_string(), "device": b.name() }),
        )
    }
}

type Writer = fn(&Path, &Tensor) -> Result<()>;

fn output_writer(path: &Path) -> Result<Writer> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
    {
        Some(e) if e == "npy" => Ok(npy::save_npy),
        Some(e) if e == "csv" => Ok(csv::save_csv),
        _ => Err(Error::invalid(format!(
            "--out must end in .npy or .csv, got {}",
            path.display()
        ))),
    }
}

/// The bench suite on the chosen device; on a GPU once in f32 and once with bf16 tensor cores.
fn bench(a: BenchArgs) -> Result<Vec<Value>> {
    let sizes = |gpu: bool| {
        let mut s = Sizes::for_device(gpu, a.quick);
        if let Some(n) = a.batch {
            s.batch = n.max(1);
        }
        s
    };
    match resolve(&a.device)? {
        Resolved::Cpu => run_suite(&flowfuse::Cpu, "f32", sizes(false)),
        Resolved::Cuda(c) => {
            let mut lines = run_suite(c.as_ref(), "f32", sizes(true))?;
            let bf16 = c.with_precision(Precision::Bf16);
            lines.extend(run_suite(&bf16, "bf16", sizes(true))?);
            Ok(lines)
        }
    }
}

/// Parses the CNF objective and trace options.
fn cnf_objective(a: &TrainArgs) -> Result<Objective> {
    let trace = match a.trace.as_str() {
        "exact" => TraceSpec::Exact,
        "hutchinson" => TraceSpec::Hutchinson {
            probes: a.probes,
            probe: ProbeKind::Rademacher,
        },
        other => {
            return Err(Error::invalid(format!(
                "unknown trace '{other}' (exact, hutchinson)"
            )));
        }
    };
    match a.objective.as_str() {
        "fm" => Ok(Objective::FlowMatching { sigma_min: 1e-4 }),
        "mle" => Ok(Objective::Mle { trace }),
        other => Err(Error::invalid(format!(
            "unknown objective '{other}' (mle, fm)"
        ))),
    }
}

/// `flowfuse train --model cnf`: a continuous flow trained by flow matching or by maximum
/// likelihood through the adjoint, in standardised coordinates.
fn train_cnf<B: Backend>(b: &B, a: TrainArgs) -> Result<Value> {
    let objective = cnf_objective(&a)?;
    let mut rng = Rng::new(a.seed);
    let (source, train_data, test_data) =
        load_split(&a.data, a.samples, a.test_fraction, &mut rng)?;
    let dim = train_data.cols();
    let hidden = match &a.hidden {
        Some(h) => parse_hidden(h)?,
        None => vec![64; a.layers.unwrap_or(2)],
    };
    let act = match &a.activation {
        Some(s) => Activation::parse(s)?,
        None => Activation::Silu,
    };
    let mut config = CnfConfig::new(dim, &hidden, act);
    config.objective = objective;
    config.solver.rtol = a.rtol;
    config.solver.atol = a.atol;
    let cnf = Cnf::new(b, config, &mut rng)?;
    let scale = if a.no_standardize {
        None
    } else {
        let st = Standardizer::fit(&train_data)?;
        Some(ActNorm::standardization(b, &st.mean, &st.std)?)
    };
    let mut model = ScaledCnf::new(cnf, scale);

    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let metrics_path = a.out.join("metrics.jsonl");
    let mut metrics =
        BufWriter::new(File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?);
    let fm = matches!(objective, Objective::FlowMatching { .. });
    // A flow-matching step is cheap (no ODE solve), and the regression keeps improving the
    // density long after the loss looks flat: on two moons, test NLL 0.436 after 20 000 steps,
    // 0.372 after 60 000 and 0.343 after 120 000 (BENCHMARKS.md), where the discrete flows
    // reach about 0.33.
    let steps = a.steps.unwrap_or(if fm { 120_000 } else { 1000 });
    let cfg = TrainConfig {
        steps,
        batch: a.batch,
        adam: AdamHyper {
            lr: a.lr.unwrap_or(3e-3),
            weight_decay: a.weight_decay,
            ..AdamHyper::default()
        },
        clip_norm: (a.clip > 0.0).then_some(a.clip),
        seed: a.seed,
        // Each held-out NLL is a full ODE solve: evaluate a few times per run, not every 500 steps.
        eval_every: a.eval_every.max(steps / 4),
        progress: !a.quiet,
        ..TrainConfig::default()
    };
    let report = train(
        &mut model,
        b,
        &train_data,
        &test_data,
        &cfg,
        Some(&mut metrics),
    )?;
    drop(metrics);

    // The work of the two solves a user runs most: a log-density and a sample, per row.
    let test_rows = b.upload(&test_data)?;
    let (_, lp_stats) = model.log_prob(b, &test_rows)?;
    let (_, sample_stats) = model.sample(b, test_data.rows(), &mut rng)?;
    let per_row =
        |s: &flowfuse::ode::SolveStats| s.row_evaluations as f64 / test_data.rows() as f64;

    let model_path = a.out.join("model.safetensors");
    let mut notes = BTreeMap::new();
    notes.insert("data".into(), source.to_string());
    notes.insert("steps".into(), cfg.steps.to_string());
    notes.insert("test_nll".into(), format!("{:.6}", report.test_nll));
    save_cnf(&model_path, b, &model, notes)?;

    let figures = if dim == 2 && !a.no_figures {
        cnf_figures(b, &model, &test_data, &a.out, a.seed)?
    } else {
        vec![]
    };
    Ok(json!({
        "model": "cnf",
        "objective": if fm { "fm" } else { "mle" },
        "trace": a.trace,
        "data": source.to_string(),
        "device": b.name(),
        "dim": dim,
        "hidden": hidden,
        "params": model.cnf.params().iter().map(|p| p.len()).sum::<usize>(),
        "train_nll": report.train_nll,
        "test_nll": report.test_nll,
        "steps": report.steps,
        "batch": cfg.batch,
        "seconds": report.seconds,
        "samples_per_second": report.samples_per_second,
        "rtol": a.rtol,
        "atol": a.atol,
        "nfe_per_log_prob": per_row(&lp_stats),
        "nfe_per_sample": per_row(&sample_stats),
        "out": a.out.display().to_string(),
        "figures": figures.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    }))
}
