//! The plans of recently seen networks, so that passes over unchanged weights (each layer of a
//! density evaluation or of sampling, batch after batch) do not pack them again. A plan is
//! found by everything it is built from: the weights' stamps (`Tensor::stamp`: one stamp, one
//! set of values), the degrees, the clamp, the activation and the tiling. Training changes the
//! weights every step, so there each pass still packs its plan; the cache then only holds the
//! last few, within a bound on their number and size.

use std::sync::{Arc, Mutex, MutexGuard};

use super::plan::{Plan, Tiling};
use crate::error::Result;
use crate::nn::mlp::{Activation, Mlp};
use crate::ops::made::MadeSpec;
use crate::tensor::Tensor;

/// The most plans kept, and the most bytes of packed weights they may hold together.
const MAX_PLANS: usize = 16;
const MAX_BYTES: usize = 64 << 20;

/// What a plan was built from.
#[derive(PartialEq)]
struct Key {
    tiling: Tiling,
    act: Activation,
    clamp: u32,
    degrees: Vec<Vec<u32>>,
    stamps: Vec<u64>,
}

impl Key {
    fn new(spec: &MadeSpec, net: &Mlp<Tensor>, tiling: Tiling) -> Key {
        Key {
            tiling,
            act: net.act,
            clamp: spec.clamp.to_bits(),
            degrees: spec.degrees.clone(),
            stamps: net.tensors().iter().map(|t| t.stamp()).collect(),
        }
    }
}

/// A bounded set of plans, most recently used last.
pub struct Plans {
    kept: Mutex<Vec<(Key, Arc<Plan>)>>,
    max_plans: usize,
    max_bytes: usize,
}

/// The plans the CPU ops use.
pub static PLANS: Plans = Plans::new(MAX_PLANS, MAX_BYTES);

impl Plans {
    pub const fn new(max_plans: usize, max_bytes: usize) -> Plans {
        Plans {
            kept: Mutex::new(Vec::new()),
            max_plans,
            max_bytes,
        }
    }

    fn kept(&self) -> MutexGuard<'_, Vec<(Key, Arc<Plan>)>> {
        // Entries are pushed and removed whole, so a panic elsewhere while the lock was held
        // cannot have left the list invalid.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The plan of `net` (already checked against `spec`) with this tiling: a kept one if the
    /// weights and degrees are the same, else a new one, which is then kept.
    pub fn get(&self, spec: &MadeSpec, net: &Mlp<Tensor>, tiling: Tiling) -> Result<Arc<Plan>> {
        let key = Key::new(spec, net, tiling);
        {
            let mut kept = self.kept();
            if let Some(i) = kept.iter().position(|(k, _)| *k == key) {
                let hit = kept.remove(i);
                let plan = hit.1.clone();
                kept.push(hit);
                return Ok(plan);
            }
        }
        // Built outside the lock: other threads' ops go on meanwhile.
        let plan = Arc::new(Plan::new(spec, net, tiling)?);
        let size = plan.bytes();
        if size <= self.max_bytes {
            let mut kept = self.kept();
            while !kept.is_empty()
                && (kept.len() >= self.max_plans || bytes(&kept) + size > self.max_bytes)
            {
                kept.remove(0);
            }
            kept.push((key, plan.clone()));
        }
        Ok(plan)
    }

    /// The number of plans kept and their bytes.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let kept = self.kept();
        (kept.len(), bytes(&kept))
    }
}

fn bytes(kept: &[(Key, Arc<Plan>)]) -> usize {
    kept.iter().map(|(_, p)| p.bytes()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::made::{Order, made};
    use crate::rng::Rng;

    fn net(seed: u64) -> (MadeSpec, Mlp<Tensor>) {
        let mut rng = Rng::new(seed);
        let (spec, net) = made(
            5,
            &[12, 12],
            Activation::Relu,
            Order::Natural,
            2.0,
            &mut rng,
        )
        .expect("valid MADE");
        let net = Mlp::new(&net.widths(), Activation::Relu, &mut rng).expect("valid widths");
        (spec, net)
    }

    /// The first weight of the first tile's first unit, as packed.
    fn first_weight(p: &Plan) -> f32 {
        p.layers[0].tiles[0].w[0]
    }

    #[test]
    fn unchanged_weights_reuse_the_plan_and_changed_ones_do_not() {
        let (spec, mut net) = net(3);
        let tiling = Tiling::Fixed(6);
        let cache = Plans::new(4, MAX_BYTES);
        let plan = |spec: &MadeSpec, net: &Mlp<Tensor>, tiling| cache.get(spec, net, tiling);
        let a = plan(&spec, &net, tiling).unwrap();
        let b = plan(&spec, &net, tiling).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "same weights, same plan");
        // A copy of the network has the same values: the same plan serves it.
        let copy = Mlp::from_tensors(net.act, net.tensors().into_iter().cloned().collect())
            .expect("two tensors per layer");
        assert!(Arc::ptr_eq(&a, &plan(&spec, &copy, tiling).unwrap()));
        // Another tiling is another plan.
        let other = plan(&spec, &net, Tiling::Degree).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        // Every way of writing to a weight gives a fresh plan with the new value.
        let first = net.layers[0].w.get(0, 0);
        let writes: [&dyn Fn(&mut Tensor, f32); 3] = [
            &|w, v| w.data_mut()[0] = v,
            &|w, v| w.row_mut(0)[0] = v,
            &|w, v| w.set(0, 0, v),
        ];
        for (i, write) in writes.iter().enumerate() {
            let v = first + 1.0 + i as f32;
            write(&mut net.layers[0].w, v);
            let fresh = plan(&spec, &net, tiling).unwrap();
            assert!(!Arc::ptr_eq(&a, &fresh));
            assert_eq!(first_weight(&fresh), v, "write {i}");
        }
        // Other degrees (another order) with the same weights: another plan.
        let (reversed, _) = {
            let mut rng = Rng::new(3);
            made(
                5,
                &[12, 12],
                Activation::Relu,
                Order::Reversed,
                2.0,
                &mut rng,
            )
            .unwrap()
        };
        let p = plan(&reversed, &net, tiling).unwrap();
        assert_eq!(p.order, reversed.order());
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let (spec, mut net) = net(4);
        let size = Plan::new(&spec, &net, Tiling::Fixed(6)).unwrap().bytes();
        // By count: at most 3 plans.
        let cache = Plans::new(3, MAX_BYTES);
        for i in 0..10 {
            net.layers[1].b.data_mut()[0] = i as f32;
            cache.get(&spec, &net, Tiling::Fixed(6)).unwrap();
            assert_eq!(cache.held(), ((i + 1).min(3), (i + 1).min(3) * size));
        }
        // By size: room for two plans, and none for a plan larger than the whole bound.
        let cache = Plans::new(10, 2 * size + size / 2);
        for i in 0..5 {
            net.layers[1].b.data_mut()[0] = i as f32;
            cache.get(&spec, &net, Tiling::Fixed(6)).unwrap();
        }
        assert_eq!(cache.held(), (2, 2 * size));
        let tiny = Plans::new(10, size - 1);
        tiny.get(&spec, &net, Tiling::Fixed(6)).unwrap();
        assert_eq!(tiny.held(), (0, 0));
    }
}
