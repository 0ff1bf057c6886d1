//! Picks the backend a command runs on: `cpu`, `cuda`, or `auto` (the GPU when one works).

use flowfuse::backend::cuda::{self, Cuda};
use flowfuse::{Backend, Cpu, Error, Result};

/// A piece of work that can run on any backend.
pub trait OnBackend {
    type Out;
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out>;
}

/// The backend a device choice resolves to.
pub enum Resolved {
    Cpu,
    Cuda(Box<Cuda>),
}

/// `auto` takes the GPU when the driver reports one and the backend opens; otherwise the CPU,
/// saying why on stderr when a GPU was there but did not open.
pub fn resolve(choice: &str) -> Result<Resolved> {
    match choice {
        "cpu" => Ok(Resolved::Cpu),
        "cuda" => Ok(Resolved::Cuda(Box::new(Cuda::open(0)?))),
        "auto" => {
            if cuda::availability().devices == 0 {
                return Ok(Resolved::Cpu);
            }
            match Cuda::open(0) {
                Ok(c) => Ok(Resolved::Cuda(Box::new(c))),
                Err(e) => {
                    eprintln!("note: using the CPU: the GPU did not open ({e})");
                    Ok(Resolved::Cpu)
                }
            }
        }
        other => Err(Error::invalid(format!(
            "unknown device '{other}' (cpu, cuda, auto)"
        ))),
    }
}

pub fn dispatch<J: OnBackend>(choice: &str, job: J) -> Result<J::Out> {
    match resolve(choice)? {
        Resolved::Cpu => job.run(&Cpu),
        Resolved::Cuda(c) => job.run(c.as_ref()),
    }
}
