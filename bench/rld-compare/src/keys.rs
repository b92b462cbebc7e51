//! Which key each request names: uniform or Zipf over `n` client names,
//! the same sequence for every target (same seed per connection index).

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::Zipf;

/// Picks client names. Names live for the whole program (leaked once).
#[derive(Debug, Clone)]
pub struct KeyChooser {
    names: &'static [String],
    zipf: Option<Zipf<f64>>,
    rng: SmallRng,
}

impl KeyChooser {
    pub fn new(count: u64, zipf_exponent: Option<f64>) -> KeyChooser {
        let names: Vec<String> = (0..count).map(|k| format!("bench-{k}")).collect();
        KeyChooser {
            names: Vec::leak(names),
            zipf: zipf_exponent.map(|s| Zipf::new(count as f64, s).expect("valid Zipf")),
            rng: SmallRng::seed_from_u64(1),
        }
    }

    /// The chooser for connection `i`: same names, its own seeded sequence.
    pub fn fork(&self, i: u64) -> KeyChooser {
        KeyChooser {
            rng: SmallRng::seed_from_u64(0x5eed + i),
            ..self.clone()
        }
    }

    #[inline]
    pub fn next(&mut self) -> &'static str {
        let i = match &self.zipf {
            Some(z) => (self.rng.sample(z) as usize).saturating_sub(1),
            None => self.rng.random_range(0..self.names.len()),
        };
        &self.names[i]
    }
}
