//! The learning-rate plateau and early stopping, stepped identically on every peer.

use crate::config::P2pConfig;

/// ReduceLROnPlateau (mode min, relative threshold 1e-4) and early stopping,
/// stepped with the members' mean validation loss: the same inputs on every peer,
/// so the same decisions at the same round.
#[derive(Clone, Debug)]
pub(crate) struct Convergence {
    best: f64,
    bad_epochs: u64,
    best_for_stop: f64,
    stop_bad: u64,
    factor: f64,
    patience: u64,
    min_lr: f64,
    stop_patience: u64,
}

impl Convergence {
    pub(crate) fn new(p: &P2pConfig) -> Self {
        Convergence {
            best: f64::INFINITY,
            bad_epochs: 0,
            best_for_stop: f64::INFINITY,
            stop_bad: 0,
            factor: p.lr_factor,
            patience: p.lr_patience,
            min_lr: p.min_lr,
            stop_patience: p.early_stop_patience,
        }
    }
    pub(crate) fn snapshot(&self) -> ((f64, u64), (f64, u64)) {
        ((self.best, self.bad_epochs), (self.best_for_stop, self.stop_bad))
    }
    pub(crate) fn restore(&mut self, plateau: (f64, u64), stopping: (f64, u64)) {
        (self.best, self.bad_epochs) = plateau;
        (self.best_for_stop, self.stop_bad) = stopping;
    }
    /// Returns (new lr, stop).
    pub(crate) fn step(&mut self, val_loss: f64, lr: f64) -> (f64, bool) {
        let mut lr = lr;
        if val_loss < self.best * (1.0 - 1e-4) {
            self.best = val_loss;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
            if self.bad_epochs > self.patience {
                lr = (lr * self.factor).max(self.min_lr);
                self.bad_epochs = 0;
            }
        }
        if val_loss < self.best_for_stop {
            self.best_for_stop = val_loss;
            self.stop_bad = 0;
        } else {
            self.stop_bad += 1;
        }
        (lr, self.stop_bad >= self.stop_patience)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_lowers_the_lr_after_patience_and_early_stopping_fires() {
        let p = P2pConfig { lr_patience: 2, early_stop_patience: 4, ..P2pConfig::default() };
        let mut c = Convergence::new(&p);
        let mut lr = 0.1;
        let mut log = vec![];
        for loss in [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95] {
            let (new_lr, stop) = c.step(loss, lr);
            lr = new_lr;
            log.push((lr, stop));
        }
        // Improvement at epochs 0 and 1; three bad epochs exceed patience 2: lr x0.1;
        // the fourth bad epoch stops the run.
        let lrs: Vec<f64> = log.iter().map(|x| x.0).collect();
        assert!((lrs[4] - 0.01).abs() < 1e-12 && (lrs[3] - 0.1).abs() < 1e-12, "{lrs:?}");
        let stops: Vec<bool> = log.iter().map(|x| x.1).collect();
        assert_eq!(stops, [false, false, false, false, false, true, true]);
        // Snapshots restore the same decisions (state sync carries them).
        let (a, b) = c.snapshot();
        let mut d = Convergence::new(&p);
        d.restore(a, b);
        assert_eq!(d.step(0.95, lr), c.clone().step(0.95, lr));
        let mut tiny = Convergence::new(&P2pConfig { lr_patience: 0, min_lr: 1e-6, ..P2pConfig::default() });
        let mut lr = 1e-6;
        tiny.step(1.0, lr);
        lr = tiny.step(1.0, lr).0;
        assert_eq!(lr, 1e-6, "never below min_lr");
    }
}
