//! The command-line tool end to end: a short training run writes the model, metrics and
//! figures and ends with one JSON line; eval and sample read the model back; bad arguments and
//! bad files give one line on stderr and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flowfuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowfuse"))
        .args(args)
        .output()
        .expect("run flowfuse")
}

/// Runs the tool and asserts that it succeeded, with its stderr in the message otherwise.
fn flowfuse_ok(args: &[&str]) -> Output {
    let out = flowfuse(args);
    assert!(
        out.status.success(),
        "flowfuse {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `flowfuse eval` of `model` on `samples` fresh two-moons points: the reported NLL.
fn eval_nll(model: &Path, samples: &str) -> f64 {
    let eval = flowfuse_ok(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "moons",
        "--samples",
        samples,
    ]);
    last_json(&eval)["nll"].as_f64().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flowfuse-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no stdout; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// One line on stderr, starting "error:", no backtrace, and the given exit code.
fn assert_clean_failure(out: &Output, code: i32, mention: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "stderr should be one line: {stderr}"
    );
    assert!(stderr.starts_with("error:"), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(
        stderr.contains(mention),
        "stderr should mention '{mention}': {stderr}"
    );
}

#[test]
fn train_eval_sample_roundtrip() {
    let dir = scratch("train");
    let out_dir = dir.join("run");
    let out = flowfuse_ok(&[
        "train",
        "--device",
        "cpu",
        "--steps",
        "60",
        "--samples",
        "1500",
        "--eval-every",
        "30",
        "--quiet",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let report = last_json(&out);
    for key in [
        "model",
        "train_nll",
        "test_nll",
        "steps",
        "seconds",
        "samples_per_second",
    ] {
        assert!(
            report.get(key).is_some(),
            "final JSON lacks '{key}': {report}"
        );
    }
    assert_eq!(report["model"], "realnvp");
    assert_eq!(report["steps"], 60);
    assert!(report["test_nll"].as_f64().unwrap().is_finite());
    for f in [
        "model.safetensors",
        "metrics.jsonl",
        "density.png",
        "samples.png",
        "layers.png",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} was not written");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            m["test_nll"].as_f64().is_some() && m["step"].as_u64().is_some(),
            "{line}"
        );
    }

    let model = out_dir.join("model.safetensors");
    let nll = eval_nll(&model, "500");
    assert!(nll.is_finite());

    for ext in ["npy", "csv"] {
        let path = dir.join(format!("s.{ext}"));
        flowfuse_ok(&[
            "sample",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "-n",
            "25",
            "--out",
            path.to_str().unwrap(),
        ]);
        let t = if ext == "npy" {
            flowfuse::train::npy::read_npy(&path)
        } else {
            flowfuse::train::csv::read_csv(&path)
        }
        .unwrap();
        assert_eq!(
            (flowfuse::Shaped::rows(&t), flowfuse::Shaped::cols(&t)),
            (25, 2)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn maf_trains_on_a_csv_file() {
    let dir = scratch("csv");
    let csv = dir.join("data.csv");
    let mut text = String::from("a,b,c\n");
    for i in 0..600 {
        let t = i as f32 * 0.01;
        text.push_str(&format!("{},{},{}\n", t.sin(), t.cos() * 2.0, t * 0.1));
    }
    std::fs::write(&csv, text).unwrap();
    let out = flowfuse_ok(&[
        "train",
        "--model",
        "maf",
        "--data",
        csv.to_str().unwrap(),
        "--steps",
        "30",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        dir.join("run").to_str().unwrap(),
    ]);
    let report = last_json(&out);
    assert_eq!(report["dim"], 3);
    // No figures for 3-D data.
    assert!(report["figures"].as_array().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let dir = scratch("bad");
    let out_dir = dir.join("o");
    let o = out_dir.to_str().unwrap();
    assert_clean_failure(&flowfuse(&["train", "--bogus"]), 2, "--bogus");
    assert_clean_failure(&flowfuse(&["train", "--steps", "ten"]), 2, "ten");
    assert_clean_failure(
        &flowfuse(&["train", "--model", "glow", "--device", "cpu", "--out", o]),
        1,
        "glow",
    );
    assert_clean_failure(
        &flowfuse(&["train", "--data", "spiral", "--device", "cpu", "--out", o]),
        1,
        "spiral",
    );
    assert_clean_failure(
        &flowfuse(&[
            "train",
            "--data",
            "/nonexistent/x.npy",
            "--device",
            "cpu",
            "--out",
            o,
        ]),
        1,
        "x.npy",
    );
    assert_clean_failure(
        &flowfuse(&["train", "--hidden", "64,0", "--device", "cpu", "--out", o]),
        1,
        "hidden",
    );
    assert_clean_failure(
        &flowfuse(&["train", "--device", "tpu", "--out", o]),
        1,
        "tpu",
    );
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    assert_clean_failure(
        &flowfuse(&[
            "eval",
            "--model",
            garbage.to_str().unwrap(),
            "--data",
            "moons",
            "--device",
            "cpu",
        ]),
        1,
        "garbage.safetensors",
    );
    assert_clean_failure(
        &flowfuse(&[
            "sample",
            "--model",
            garbage.to_str().unwrap(),
            "--out",
            "x.txt",
            "--device",
            "cpu",
        ]),
        1,
        "x.txt",
    );
    let nan_csv = dir.join("nan.csv");
    std::fs::write(&nan_csv, "1,2\n3,nan\n").unwrap();
    assert_clean_failure(
        &flowfuse(&[
            "train",
            "--data",
            nan_csv.to_str().unwrap(),
            "--device",
            "cpu",
            "--out",
            o,
        ]),
        1,
        "nan.csv",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn info_reports_backends() {
    let out = flowfuse_ok(&["info"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["gpu"].as_str().unwrap().contains("usable"));
    assert!(v["kernel_build"].as_str().is_some());
}

#[test]
fn cnf_trains_evaluates_and_samples() {
    let dir = scratch("cnf");
    for (objective, trace) in [("fm", "exact"), ("mle", "hutchinson")] {
        let out_dir = dir.join(objective);
        let out = flowfuse_ok(&[
            "train",
            "--model",
            "cnf",
            "--objective",
            objective,
            "--trace",
            trace,
            "--device",
            "cpu",
            "--steps",
            "20",
            "--batch",
            "128",
            "--samples",
            "600",
            "--rtol",
            "1e-3",
            "--atol",
            "1e-3",
            "--quiet",
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        let report = last_json(&out);
        assert_eq!(report["model"], "cnf");
        assert!(report["test_nll"].as_f64().unwrap().is_finite());
        assert!(
            report["nfe_per_log_prob"].as_f64().unwrap() >= 8.0,
            "{report}"
        );
        assert!(
            report["nfe_per_sample"].as_f64().unwrap() >= 8.0,
            "{report}"
        );
        for f in [
            "model.safetensors",
            "metrics.jsonl",
            "density.png",
            "samples.png",
            "trajectories.png",
        ] {
            assert!(
                out_dir.join(f).is_file(),
                "{objective}: {f} was not written"
            );
        }
        let model = out_dir.join("model.safetensors");
        let nll = eval_nll(&model, "300");
        // The reloaded model gives the NLL of the run it came from, on the same kind of data.
        assert!(nll.is_finite());
        flowfuse_ok(&[
            "sample",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "-n",
            "10",
            "--out",
            dir.join("c.npy").to_str().unwrap(),
        ]);
    }
    assert_clean_failure(
        &flowfuse(&[
            "train",
            "--model",
            "cnf",
            "--objective",
            "kl",
            "--device",
            "cpu",
            "--out",
            dir.join("x").to_str().unwrap(),
        ]),
        1,
        "kl",
    );
    std::fs::remove_dir_all(&dir).ok();
}
