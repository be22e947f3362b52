//! Dynamic loss scaling for f16 training, with torch's `GradScaler` rules: the loss is
//! multiplied by `scale` before the backward pass so small gradients survive f16; a step whose
//! gradients overflow is skipped and the scale halved; after `growth_interval` clean steps in a
//! row the scale doubles.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Clean steps since the last change.
    pub tracker: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            tracker: 0,
        }
    }
}

impl LossScaler {
    /// Records one step: `finite` is whether its gradients were all finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.tracker += 1;
            if self.tracker >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.tracker = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.tracker = 0;
        }
    }
}
