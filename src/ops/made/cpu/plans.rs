//! The plans of recently seen networks, so that passes over unchanged weights (each layer of a
//! density evaluation or of sampling, batch after batch) do not pack them again. A plan is
//! found by everything it is built from: the weights' stamps (`Tensor::stamp`: one stamp, one
//! set of values), the degrees, the clamp, the activation and the tiling. Training changes the
//! weights every step, so there each pass still packs its plan; the cache then only holds the
//! last few (`backend::cpu::cache`).

use std::sync::Arc;

use super::plan::{Plan, Tiling};
use crate::backend::cpu::cache::{Cache, Footprint, stamps};
use crate::error::Result;
use crate::nn::mlp::{Activation, Mlp};
use crate::ops::made::MadeSpec;
use crate::tensor::Tensor;

/// What a plan is built from.
#[derive(PartialEq)]
struct Key {
    tiling: Tiling,
    act: Activation,
    clamp: u32,
    degrees: Vec<Vec<u32>>,
    stamps: Vec<u64>,
}

impl Footprint for Plan {
    fn bytes(&self) -> usize {
        Plan::bytes(self)
    }
}

/// At most 16 plans (a 5-layer MAF's forward and backward, with room), 64 MiB in all.
static PLANS: Cache<Key, Plan> = Cache::new(16, 64 << 20);

/// Drops every kept plan.
pub fn clear() {
    PLANS.clear();
}

/// The plan of `net` (already checked against `spec`) with this tiling.
pub fn plan(spec: &MadeSpec, net: &Mlp<Tensor>, tiling: Tiling) -> Result<Arc<Plan>> {
    plan_in(&PLANS, spec, net, tiling)
}

fn plan_in(
    cache: &Cache<Key, Plan>,
    spec: &MadeSpec,
    net: &Mlp<Tensor>,
    tiling: Tiling,
) -> Result<Arc<Plan>> {
    let key = Key {
        tiling,
        act: net.act,
        clamp: spec.clamp.to_bits(),
        degrees: spec.degrees.clone(),
        stamps: stamps(net.tensors()),
    };
    cache.get_or_build(key, || Plan::new(spec, net, tiling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::made::{Order, made};
    use crate::rng::Rng;

    fn net(order: Order) -> (MadeSpec, Mlp<Tensor>) {
        let mut rng = Rng::new(3);
        let (spec, net) =
            made(5, &[12, 12], Activation::Relu, order, 2.0, &mut rng).expect("valid MADE");
        let net = Mlp::new(&net.widths(), Activation::Relu, &mut rng).expect("valid widths");
        (spec, net)
    }

    /// The first weight of the first tile's first unit, as packed.
    fn first_weight(p: &Plan) -> f32 {
        p.layers[0].tiles[0].w[0]
    }

    #[test]
    fn unchanged_weights_reuse_the_plan_and_changed_ones_do_not() {
        let (spec, mut net) = net(Order::Natural);
        let tiling = Tiling::Fixed(6);
        let cache = Cache::new(4, 64 << 20);
        let plan = |spec: &MadeSpec, net: &Mlp<Tensor>, tiling| {
            plan_in(&cache, spec, net, tiling).unwrap()
        };
        let a = plan(&spec, &net, tiling);
        assert!(Arc::ptr_eq(&a, &plan(&spec, &net, tiling)), "same weights");
        // A copy of the network has the same values: the same plan serves it.
        let copy = Mlp::from_tensors(net.act, net.tensors().into_iter().cloned().collect())
            .expect("two tensors per layer");
        assert!(Arc::ptr_eq(&a, &plan(&spec, &copy, tiling)));
        // Another tiling, or other degrees with the same weights: another plan.
        assert!(!Arc::ptr_eq(&a, &plan(&spec, &net, Tiling::Degree)));
        let (reversed, _) = self::net(Order::Reversed);
        assert_eq!(plan(&reversed, &net, tiling).order, reversed.order());
        // Every way of writing to a weight gives a fresh plan with the new value.
        let first = net.layers[0].w.get(0, 0);
        type Write<'a> = &'a dyn Fn(&mut Tensor, f32);
        let writes: [Write; 3] = [
            &|w, v| w.data_mut()[0] = v,
            &|w, v| w.row_mut(0)[0] = v,
            &|w, v| w.set(0, 0, v),
        ];
        for (i, write) in writes.iter().enumerate() {
            let v = first + 1.0 + i as f32;
            write(&mut net.layers[0].w, v);
            let fresh = plan(&spec, &net, tiling);
            assert!(!Arc::ptr_eq(&a, &fresh));
            assert_eq!(first_weight(&fresh), v, "write {i}");
        }
    }
}
