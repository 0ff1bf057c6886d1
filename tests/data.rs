//! Built-in data sets, .npy and .csv files, the split, standardisation and mini-batches.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use flowfuse::train::csv::{read_csv, save_csv};
use flowfuse::train::data::{
    Batches, BuiltinSet, DataSource, EIGHT_GAUSSIANS_RADIUS, EIGHT_GAUSSIANS_STD, Standardizer,
    checkerboard, circles_with, eight_gaussians, moons_with_noise, train_test_split,
};
use flowfuse::train::npy::{read_npy, save_npy};
use flowfuse::{Error, Rng, Shaped, Tensor};

fn dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-{test}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn column_mean_std(t: &Tensor, j: usize) -> (f64, f64) {
    let n = t.rows() as f64;
    let m = (0..t.rows()).map(|i| t.get(i, j) as f64).sum::<f64>() / n;
    let v = (0..t.rows())
        .map(|i| (t.get(i, j) as f64 - m).powi(2))
        .sum::<f64>()
        / n;
    (m, v.sqrt())
}

// ---------------------------------------------------------------- built-in sets

#[test]
fn every_builtin_set_has_shape_seeded_determinism_and_extent() {
    for set in BuiltinSet::ALL {
        let n = 3001;
        let a = set.generate(n, &mut Rng::new(42));
        let b = set.generate(n, &mut Rng::new(42));
        let c = set.generate(n, &mut Rng::new(43));
        assert_eq!(a.shape(), (n, 2), "{set}");
        assert_eq!(a, b, "{set}: same seed, different data");
        assert_ne!(a, c, "{set}: different seeds, same data");
        a.check_finite(set.name()).unwrap();
        let max = a.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max <= 4.5, "{set}: |value| up to {max}");
        for j in 0..2 {
            let (_, sd) = column_mean_std(&a, j);
            assert!(sd > 0.2, "{set}: column {j} nearly constant (std {sd})");
        }
        assert_eq!(set.generate(0, &mut Rng::new(1)).shape(), (0, 2));
        assert_eq!(BuiltinSet::from_name(set.name()), Some(set));
    }
}

#[test]
fn noiseless_moons_lie_on_their_half_circles() {
    let n = 101;
    let t = moons_with_noise(n, 0.0, &mut Rng::new(1)).unwrap();
    let (mut upper, mut lower) = (0, 0);
    for i in 0..n {
        let (x, y) = (t.get(i, 0) as f64, t.get(i, 1) as f64);
        if ((x * x + y * y).sqrt() - 1.0).abs() < 1e-5 && y >= -1e-6 {
            upper += 1;
        } else {
            let r = ((x - 1.0).powi(2) + (y - 0.5).powi(2)).sqrt();
            assert!(
                (r - 1.0).abs() < 1e-5 && y <= 0.5 + 1e-6,
                "({x}, {y}) on neither moon"
            );
            lower += 1;
        }
    }
    assert_eq!((upper, lower), (50, 51));
    // The end points t = 0 and t = π are included.
    let has = |px: f32, py: f32| {
        (0..n).any(|i| (t.get(i, 0) - px).abs() < 1e-6 && (t.get(i, 1) - py).abs() < 1e-6)
    };
    assert!(has(1.0, 0.0) && has(-1.0, 0.0) && has(0.0, 0.5) && has(2.0, 0.5));
    // Shuffled: the first half is not all on one moon.
    let first_upper = (0..n / 2).filter(|&i| t.get(i, 1) > 0.5).count();
    assert!(first_upper > 5 && first_upper < n / 2 - 5);
    // Noise moves points off the curves.
    let noisy = moons_with_noise(n, 0.1, &mut Rng::new(1)).unwrap();
    assert!(noisy.max_abs_diff(&t).unwrap() > 0.05);
    assert!(matches!(
        moons_with_noise(10, -0.1, &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        moons_with_noise(10, f64::NAN, &mut Rng::new(1)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn noiseless_circles_have_two_radii() {
    let t = circles_with(200, 0.5, 0.0, &mut Rng::new(2)).unwrap();
    let radii: Vec<f32> = (0..200).map(|i| t.get(i, 0).hypot(t.get(i, 1))).collect();
    assert_eq!(
        radii.iter().filter(|r| (*r - 1.0).abs() < 1e-5).count(),
        100
    );
    assert_eq!(
        radii.iter().filter(|r| (*r - 0.5).abs() < 1e-5).count(),
        100
    );
    assert!(circles_with(10, 1.0, 0.0, &mut Rng::new(2)).is_err());
    assert!(circles_with(10, 0.5, f64::INFINITY, &mut Rng::new(2)).is_err());
}

#[test]
fn eight_gaussians_has_eight_balanced_components() {
    let n = 8000;
    let t = eight_gaussians(n, &mut Rng::new(3));
    let mut counts = [0usize; 8];
    let mut sq = 0.0f64;
    for i in 0..n {
        let (x, y) = (t.get(i, 0) as f64, t.get(i, 1) as f64);
        let k = ((y.atan2(x) / (std::f64::consts::PI / 4.0)).round() as i64).rem_euclid(8) as usize;
        let a = k as f64 * std::f64::consts::PI / 4.0;
        let (cx, cy) = (
            EIGHT_GAUSSIANS_RADIUS * a.cos(),
            EIGHT_GAUSSIANS_RADIUS * a.sin(),
        );
        sq += (x - cx).powi(2) + (y - cy).powi(2);
        counts[k] += 1;
    }
    for c in counts {
        assert!((800..1200).contains(&c), "{counts:?}");
    }
    // Mean squared distance to the centre is 2·std² for an isotropic 2-D Gaussian.
    let std = (sq / n as f64 / 2.0).sqrt();
    assert!(
        (std - EIGHT_GAUSSIANS_STD).abs() < 0.02,
        "component std {std}"
    );
}

#[test]
fn checkerboard_fills_only_the_black_squares() {
    let t = checkerboard(4000, &mut Rng::new(4));
    let mut cells = HashSet::new();
    for i in 0..t.rows() {
        let (x, y) = (t.get(i, 0), t.get(i, 1));
        assert!((-4.0..=4.0).contains(&x) && (-4.0..=4.0).contains(&y));
        let (cx, cy) = (
            ((x + 4.0) / 2.0).floor() as i32,
            ((y + 4.0) / 2.0).floor() as i32,
        );
        assert_eq!((cx + cy) % 2, 0, "({x}, {y}) in a white square");
        cells.insert((cx, cy));
    }
    assert_eq!(cells.len(), 8);
}

// ---------------------------------------------------------------- data sources

#[test]
fn data_source_parses_names_and_paths() {
    assert_eq!(
        DataSource::parse("moons").unwrap(),
        DataSource::Builtin(BuiltinSet::Moons)
    );
    assert_eq!(
        DataSource::parse("8Gaussians").unwrap(),
        DataSource::Builtin(BuiltinSet::EightGaussians)
    );
    assert_eq!(
        DataSource::parse("d/x.npy").unwrap(),
        DataSource::Npy("d/x.npy".into())
    );
    assert_eq!(
        DataSource::parse("X.CSV").unwrap(),
        DataSource::Csv("X.CSV".into())
    );
    assert_eq!(
        "swissroll".parse::<DataSource>().unwrap().to_string(),
        "swissroll"
    );
    for bad in ["moon", "", "data.txt", "npy"] {
        match DataSource::parse(bad) {
            Err(Error::InvalidArgument(msg)) => {
                for choice in [
                    "moons",
                    "circles",
                    "8gaussians",
                    "checkerboard",
                    "pinwheel",
                    "swissroll",
                    ".npy",
                    ".csv",
                ] {
                    assert!(msg.contains(choice), "'{msg}' does not list {choice}");
                }
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn data_source_loads_builtins_and_files() {
    let mut rng = Rng::new(5);
    let src = DataSource::parse("pinwheel").unwrap();
    assert_eq!(src.load(300, &mut rng).unwrap().shape(), (300, 2));
    assert!(matches!(src.load(0, &mut rng), Err(Error::Empty(_))));

    let d = dir("source");
    let t = Tensor::randn(7, 3, &mut rng);
    save_npy(&d.join("a.npy"), &t).unwrap();
    save_csv(&d.join("a.csv"), &t).unwrap();
    for name in ["a.npy", "a.csv"] {
        let src = DataSource::parse(d.join(name).to_str().unwrap()).unwrap();
        assert_eq!(src.load(0, &mut rng).unwrap(), t, "{name}");
    }
    let missing = DataSource::parse(d.join("missing.npy").to_str().unwrap()).unwrap();
    assert!(matches!(missing.load(10, &mut rng), Err(Error::Io { .. })));
}

// ---------------------------------------------------------------- .npy

/// An .npy file from its parts, padded as NumPy pads it.
fn npy_bytes(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
    let len_width = if major == 1 { 2 } else { 4 };
    let mut h = header.to_string();
    let unpadded = 8 + len_width + h.len() + 1;
    h.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    h.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn data_reason(r: flowfuse::Result<Tensor>) -> String {
    match r {
        Err(Error::Data { reason, .. }) => reason,
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

#[test]
fn npy_f32_round_trip_is_exact_and_numpy_shaped() {
    let d = dir("npy-roundtrip");
    let t = Tensor::randn(37, 5, &mut Rng::new(6)).map(|v| v * 1e3);
    let p = d.join("t.npy");
    save_npy(&p, &t).unwrap();
    assert_eq!(read_npy(&p).unwrap(), t);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (37, 5), }"));
    assert!(header.ends_with('\n'));
    assert_eq!(bytes.len(), 10 + header_len + 37 * 5 * 4);
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");

    assert!(matches!(
        save_npy(&d.join("e.npy"), &Tensor::zeros(0, 2)),
        Err(Error::Empty(_))
    ));
    let mut bad = t.clone();
    bad.set(3, 4, f32::NAN);
    assert!(matches!(
        save_npy(&d.join("n.npy"), &bad),
        Err(Error::NonFinite { row: 3, col: 4, .. })
    ));
}

#[test]
fn npy_reads_f64_big_endian_fortran_and_v2_v3() {
    let d = dir("npy-variants");
    let want = Tensor::from_vec(2, 3, vec![1.5, -2.0, 3.25, 4.0, 0.1, -6.0]).unwrap();

    let f8: Vec<u8> = want
        .data()
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    let p = write(
        &d.join("f8.npy"),
        &npy_bytes(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
            &f8,
        ),
    );
    assert_eq!(read_npy(&p).unwrap(), want);

    let be: Vec<u8> = want
        .data()
        .iter()
        .flat_map(|&v| (v as f64).to_be_bytes())
        .collect();
    let p = write(
        &d.join("be.npy"),
        &npy_bytes(
            1,
            "{'descr': '>f8', 'fortran_order': False, 'shape': (2, 3), }",
            &be,
        ),
    );
    assert_eq!(read_npy(&p).unwrap(), want);

    // Fortran order stores column after column.
    let col_major: Vec<u8> = want
        .transpose()
        .data()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let p = write(
        &d.join("fortran.npy"),
        &npy_bytes(
            2,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &col_major,
        ),
    );
    assert_eq!(read_npy(&p).unwrap(), want);

    // Version 3.0 allows a UTF-8 header; key order and quoting may vary.
    let f4: Vec<u8> = want.data().iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(
        &d.join("v3.npy"),
        &npy_bytes(
            3,
            "{\"shape\": (2, 3), \"fortran_order\": False, \"descr\": \"<f4\"}",
            &f4,
        ),
    );
    assert_eq!(read_npy(&p).unwrap(), want);

    // A non-finite f8 value is reported at its matrix position, also in Fortran order.
    let mut vals: Vec<f64> = want.transpose().data().iter().map(|&v| v as f64).collect();
    vals[3] = f64::NAN; // column 1, row 1
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(
        &d.join("nan.npy"),
        &npy_bytes(
            1,
            "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }",
            &bytes,
        ),
    );
    assert!(matches!(
        read_npy(&p),
        Err(Error::NonFinite { row: 1, col: 1, .. })
    ));

    let mut big = f8.clone();
    big[8..16].copy_from_slice(&1e300f64.to_le_bytes());
    let p = write(
        &d.join("big.npy"),
        &npy_bytes(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
            &big,
        ),
    );
    let reason = data_reason(read_npy(&p));
    assert!(
        reason.contains("row 0, column 1") && reason.contains("f32 range"),
        "{reason}"
    );
}

#[test]
fn npy_errors_name_what_is_wrong() {
    let d = dir("npy-errors");
    let f4 = |n: usize| vec![0u8; 4 * n];
    let hdr = |descr: &str, shape: &str| {
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
    };

    let p = write(
        &d.join("1d.npy"),
        &npy_bytes(1, &hdr("<f4", "(6,)"), &f4(6)),
    );
    let r = data_reason(read_npy(&p));
    assert!(r.contains("(6,)") && r.contains("1-D"), "{r}");
    let p = write(
        &d.join("3d.npy"),
        &npy_bytes(1, &hdr("<f4", "(2, 3, 1)"), &f4(6)),
    );
    assert!(data_reason(read_npy(&p)).contains("(2, 3, 1)"));
    let p = write(&d.join("0d.npy"), &npy_bytes(1, &hdr("<f4", "()"), &f4(1)));
    assert!(data_reason(read_npy(&p)).contains("()"));

    for descr in ["<i4", "|u1", "<f2", "<c8"] {
        let p = write(
            &d.join("dtype.npy"),
            &npy_bytes(1, &hdr(descr, "(2, 2)"), &f4(4)),
        );
        let r = data_reason(read_npy(&p));
        assert!(r.contains(descr) && r.contains("<f4"), "{r}");
    }

    let p = write(
        &d.join("empty.npy"),
        &npy_bytes(1, &hdr("<f4", "(0, 2)"), &[]),
    );
    assert!(matches!(read_npy(&p), Err(Error::Empty(_))));

    let good = npy_bytes(1, &hdr("<f4", "(3, 2)"), &f4(6));
    let p = write(&d.join("short.npy"), &good[..good.len() - 3]);
    assert!(data_reason(read_npy(&p)).contains("truncated"));
    let mut long = good.clone();
    long.push(0);
    let p = write(&d.join("long.npy"), &long);
    assert!(data_reason(read_npy(&p)).contains("trailing"));
    // Truncated anywhere in the preamble or header: an error, never a panic.
    for cut in 0..80 {
        let p = write(&d.join("cut.npy"), &good[..cut]);
        assert!(
            matches!(read_npy(&p), Err(Error::Data { .. })),
            "cut at {cut}"
        );
    }

    let mut magic = good.clone();
    magic[1] = b'X';
    let p = write(&d.join("magic.npy"), &magic);
    assert!(data_reason(read_npy(&p)).contains("magic"));
    let mut version = good.clone();
    version[6] = 4;
    let p = write(&d.join("version.npy"), &version);
    assert!(data_reason(read_npy(&p)).contains("version 4"));

    for header in [
        "{'descr': '<f4', 'shape': (2, 2), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'extra': 1}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 2)}",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 2)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -2)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2)} trailing",
        "not a dict",
        "{'descr': '<f4",
    ] {
        let p = write(&d.join("header.npy"), &npy_bytes(1, header, &f4(4)));
        assert!(matches!(read_npy(&p), Err(Error::Data { .. })), "{header}");
    }
    let p = write(
        &d.join("utf8.npy"),
        &npy_bytes(1, &hdr("<f4", "(2, 2)").replace("descr", "déscr"), &f4(4)),
    );
    assert!(data_reason(read_npy(&p)).contains("ASCII"));

    let mut nan = f4(6);
    nan[16..20].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let p = write(
        &d.join("inf.npy"),
        &npy_bytes(1, &hdr("<f4", "(3, 2)"), &nan),
    );
    assert!(matches!(
        read_npy(&p),
        Err(Error::NonFinite { row: 2, col: 0, .. })
    ));
}

// ---------------------------------------------------------------- .csv

#[test]
fn csv_reads_with_and_without_header() {
    let d = dir("csv");
    let want = Tensor::from_vec(3, 2, vec![1.0, 2.0, -3.5, 4e-3, 5.0, 6.0]).unwrap();
    let bare = write(&d.join("bare.csv"), b"1,2\n-3.5,0.004\n5,6\n");
    assert_eq!(read_csv(&bare).unwrap(), want);
    let with_header = write(
        &d.join("header.csv"),
        b"x, y\r\n\r\n1, 2\r\n -3.5 ,4e-3\r\n\n5,6",
    );
    assert_eq!(read_csv(&with_header).unwrap(), want);

    let t = Tensor::randn(50, 4, &mut Rng::new(8)).map(|v| v * 123.456);
    let p = d.join("round.csv");
    save_csv(&p, &t).unwrap();
    assert_eq!(read_csv(&p).unwrap(), t, "CSV round trip is not exact");
    let leftovers = std::fs::read_dir(&d).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")
    });
    assert_eq!(leftovers.count(), 0);
    assert!(matches!(
        save_csv(&d.join("e.csv"), &Tensor::zeros(2, 0)),
        Err(Error::Empty(_))
    ));
}

#[test]
fn csv_errors_name_line_and_column() {
    let d = dir("csv-errors");
    let reason = |name: &str, text: &str| match read_csv(&write(&d.join(name), text.as_bytes())) {
        Err(Error::Data { reason, .. }) => reason,
        other => panic!("{text:?}: expected Error::Data, got {other:?}"),
    };
    let r = reason("ragged.csv", "1,2\n3,4\n\n5,6,7\n");
    assert!(r.contains("line 4") && r.contains("3 columns"), "{r}");
    let r = reason("cell.csv", "a,b\n1,2\n3,x4\n");
    assert!(r.contains("line 3, column 2") && r.contains("x4"), "{r}");
    let r = reason("emptycell.csv", "1,2\n3,\n");
    assert!(r.contains("line 2, column 2"), "{r}");
    let r = reason("nan.csv", "1,2\nnan,4\n");
    assert!(r.contains("line 2, column 1"), "{r}");
    let r = reason("inf.csv", "1,2\n3,1e39\n");
    assert!(r.contains("line 2, column 2"), "{r}");
    let r = reason("headerwidth.csv", "x,y,z\n1,2\n");
    assert!(r.contains("header"), "{r}");
    assert!(matches!(
        read_csv(&write(&d.join("binary.csv"), &[0xff, 0xfe, b'1'])),
        Err(Error::Data { .. })
    ));

    for (name, text) in [
        ("empty.csv", ""),
        ("blank.csv", "\n \n"),
        ("onlyheader.csv", "x,y\n"),
    ] {
        assert!(
            matches!(
                read_csv(&write(&d.join(name), text.as_bytes())),
                Err(Error::Empty(_))
            ),
            "{name}"
        );
    }
    assert!(matches!(
        read_csv(&d.join("missing.csv")),
        Err(Error::Io { .. })
    ));
}

// ---------------------------------------------------------------- split, standardiser, batches

#[test]
fn train_test_split_partitions_the_rows() {
    let data = Tensor::from_fn(100, 2, |i, j| (i * 2 + j) as f32);
    let (train, test) = train_test_split(&data, 0.2, &mut Rng::new(9)).unwrap();
    assert_eq!((train.rows(), test.rows()), (80, 20));
    let ids: Vec<usize> = (0..train.rows())
        .map(|i| train.get(i, 0) as usize / 2)
        .chain((0..test.rows()).map(|i| test.get(i, 0) as usize / 2))
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 100);
    let test_ids: Vec<usize> = (0..20).map(|i| test.get(i, 0) as usize / 2).collect();
    assert_ne!(test_ids, (0..20).collect::<Vec<_>>(), "not shuffled");
    let again = train_test_split(&data, 0.2, &mut Rng::new(9)).unwrap();
    assert_eq!((train, test), again);

    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        assert!(matches!(
            train_test_split(&data, bad, &mut Rng::new(9)),
            Err(Error::InvalidArgument(_))
        ));
    }
    let tiny = Tensor::zeros(3, 2);
    assert!(matches!(
        train_test_split(&tiny, 0.1, &mut Rng::new(9)),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        train_test_split(&tiny, 0.9, &mut Rng::new(9)),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        train_test_split(&Tensor::zeros(0, 2), 0.5, &mut Rng::new(9)),
        Err(Error::Empty(_))
    ));
}

#[test]
fn standardizer_whitens_inverts_and_accounts_for_the_jacobian() {
    let mut rng = Rng::new(10);
    let mut data = Tensor::randn(2000, 3, &mut rng);
    for i in 0..data.rows() {
        let r = data.row_mut(i);
        r[0] = 3.0 * r[0] + 5.0;
        r[1] = 0.2 * r[1] - 1.0;
        r[2] = 7.0; // constant column
    }
    let s = Standardizer::fit(&data).unwrap();
    assert!(
        (s.mean[0] - 5.0).abs() < 0.2 && (s.std[0] - 3.0).abs() < 0.15,
        "{s:?}"
    );
    assert_eq!((s.mean[2], s.std[2]), (7.0, 1.0));
    let u = s.apply(&data).unwrap();
    for j in 0..2 {
        let (m, sd) = column_mean_std(&u, j);
        assert!(
            m.abs() < 1e-5 && (sd - 1.0).abs() < 1e-5,
            "column {j}: mean {m}, std {sd}"
        );
    }
    assert!(u.data().iter().skip(2).step_by(3).all(|&v| v == 0.0));
    let back = s.invert(&u).unwrap();
    flowfuse::testing::assert_close("invert(apply(x))", &back, &data, 1e-5, 1e-5);

    // log N(x; mean, diag std²) = log N(u; 0, I) − Σ log std, for the non-constant columns.
    let s2 = Standardizer::new(s.mean[..2].to_vec(), s.std[..2].to_vec()).unwrap();
    let x = [4.0f32, -0.8];
    let u = s2
        .apply(&Tensor::from_vec(1, 2, x.to_vec()).unwrap())
        .unwrap();
    let log_n01 = |v: &[f32]| {
        v.iter()
            .map(|&a| -0.5 * (a as f64).powi(2) - 0.5 * (2.0 * std::f64::consts::PI).ln())
            .sum::<f64>()
    };
    let direct: f64 = (0..2)
        .map(|j| {
            let (m, sd) = (s2.mean[j] as f64, s2.std[j] as f64);
            -0.5 * ((x[j] as f64 - m) / sd).powi(2)
                - sd.ln()
                - 0.5 * (2.0 * std::f64::consts::PI).ln()
        })
        .sum();
    assert!((log_n01(u.row(0)) - s2.log_det() - direct).abs() < 1e-5);
    assert!(
        (s.log_det() - s2.log_det()).abs() < 1e-12,
        "constant column changed log_det"
    );

    assert!(matches!(
        s.apply(&Tensor::zeros(4, 2)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        s.invert(&Tensor::zeros(4, 5)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        Standardizer::fit(&Tensor::zeros(0, 3)),
        Err(Error::Empty(_))
    ));
    let mut nan = data.clone();
    nan.set(5, 1, f32::NAN);
    assert!(matches!(
        Standardizer::fit(&nan),
        Err(Error::NonFinite { row: 5, col: 1, .. })
    ));
    assert!(Standardizer::new(vec![0.0], vec![0.0]).is_err());
    assert!(Standardizer::new(vec![0.0, 1.0], vec![1.0]).is_err());
}

#[test]
fn batches_are_seeded_and_cover_each_epoch() {
    let n = 12;
    let mut a = Batches::new(n, &mut Rng::new(11)).unwrap();
    let mut b = Batches::new(n, &mut Rng::new(11)).unwrap();
    let mut epochs = Vec::new();
    for _ in 0..3 {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let batch = a.next_batch(4);
            assert_eq!(batch, b.next_batch(4));
            assert_eq!(batch.len(), 4);
            seen.extend(batch);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..n).collect::<Vec<_>>(),
            "an epoch must visit every row once"
        );
        epochs.push(seen);
    }
    assert_ne!(epochs[0], epochs[1], "no reshuffle between epochs");
    assert_eq!(a.epoch(), 2);
    let mut c = Batches::new(n, &mut Rng::new(12)).unwrap();
    assert_ne!(
        c.next_batch(12),
        Batches::new(n, &mut Rng::new(11)).unwrap().next_batch(12)
    );

    // A remainder shorter than a batch is dropped: 10 rows in batches of 4 → 2 per epoch.
    let mut d = Batches::new(10, &mut Rng::new(13)).unwrap();
    let first: HashSet<usize> = d.next_batch(4).into_iter().chain(d.next_batch(4)).collect();
    assert_eq!(first.len(), 8);
    assert_eq!(d.epoch(), 0);
    d.next_batch(4);
    assert_eq!(d.epoch(), 1);

    assert_eq!(d.next_batch(50).len(), 10);
    assert!(d.next_batch(0).is_empty());
    assert!(matches!(
        Batches::new(0, &mut Rng::new(1)),
        Err(Error::Empty(_))
    ));
}
