//! Checkpoints of continuous flows: a saved CNF (with its standardisation) reloads to the same
//! log-densities, and a file of the wrong kind is refused with its path named.

use std::collections::BTreeMap;

use flowfuse::backend::Cpu;
use flowfuse::cnf::{Cnf, CnfConfig, ScaledCnf};
use flowfuse::flows::actnorm::ActNorm;
use flowfuse::nn::Activation;
use flowfuse::testing::assert_close;
use flowfuse::train::model::{Model, load, load_flow, save_cnf};
use flowfuse::{Error, Rng, Tensor};

#[test]
fn cnf_checkpoint_roundtrip() {
    let b = Cpu;
    let dir = std::env::temp_dir().join(format!("flowfuse-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(3);
    let mut cnf = Cnf::new(&b, CnfConfig::new(2, &[16, 16], Activation::Tanh), &mut rng).unwrap();
    // Non-trivial weights: a fresh field is small.
    for p in cnf.params_mut() {
        *p = p.map(|v| 3.0 * v);
    }
    for scale in [
        None,
        Some(ActNorm::standardization(&b, &[0.5, -1.0], &[2.0, 0.25]).unwrap()),
    ] {
        let scaled = scale.is_some();
        let model = ScaledCnf::new(Cnf::from_state(&b, &cnf.state(&b).unwrap()).unwrap(), scale);
        let path = dir.join(format!("cnf-{scaled}.safetensors"));
        save_cnf(&path, &b, &model, BTreeMap::new()).unwrap();
        let (loaded, meta) = load(&path, &b).unwrap();
        assert_eq!(meta.kind, "cnf");
        let Model::Cnf(loaded) = loaded else {
            panic!("loaded a discrete flow")
        };
        assert_eq!(loaded.scale.is_some(), scaled);
        let x = Tensor::randn(6, 2, &mut Rng::new(9));
        let (want, _) = model.log_prob(&b, &x).unwrap();
        let (got, _) = loaded.log_prob(&b, &x).unwrap();
        assert_close("log_prob after reload", &got, &want, 0.0, 0.0);
        match load_flow(&path, &b) {
            Err(Error::Checkpoint { path: p, .. }) => assert_eq!(p, path),
            other => panic!("a CNF loaded as a discrete flow: {:?}", other.err()),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
