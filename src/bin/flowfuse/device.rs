//! Picks the backend a command runs on: `cpu`, `cuda`, or `auto` (the GPU when one works).

use flowfuse::backend::cuda;
use flowfuse::{Backend, Cpu, Error, Result};

/// A piece of work that can run on any backend.
pub trait OnBackend {
    type Out;
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out>;
}

pub fn dispatch<J: OnBackend>(choice: &str, job: J) -> Result<J::Out> {
    match choice {
        "cpu" => job.run(&Cpu),
        "cuda" => run_cuda(job),
        "auto" => {
            if cuda::availability().devices > 0 {
                run_cuda(job)
            } else {
                job.run(&Cpu)
            }
        }
        other => Err(Error::invalid(format!(
            "unknown device '{other}' (cpu, cuda, auto)"
        ))),
    }
}

fn run_cuda<J: OnBackend>(_job: J) -> Result<J::Out> {
    let avail = cuda::availability();
    if avail.devices == 0 {
        return Err(Error::NoDevice(avail.reason));
    }
    Err(Error::Unsupported {
        op: "training",
        backend: "cuda".into(),
    })
}
