//! Where a training step's time goes inside kiln's fused ops: calls and wall time per op,
//! forward and backward apart, collected while [`enable`]d (`kiln bench --profile`).
//!
//! Off, a fused op pays one relaxed atomic load. On, each op's forward kernel and its backward
//! are timed on the calling thread. On CUDA kernels run asynchronously, so a time is the
//! launch's unless [`wait_for`] names the device: each timed op then waits for it before and
//! after (its time is its kernels'), and so does [`wait`] (the step's pass times); the waits
//! slow the profiled step down.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<(&'static str, Pass), OpStats>> = Mutex::new(BTreeMap::new());
static WAIT_FOR: Mutex<Option<Device>> = Mutex::new(None);

/// Which part of a step: an op's forward kernel, its whole backward (kernels and the candle ops
/// it calls), or an optimizer kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    Forward,
    Backward,
    Update,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::Update => "update",
        }
    }
}

/// Calls and total wall time of one op in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStats {
    pub calls: u64,
    pub seconds: f64,
}

/// Turns collection on or off (what was collected stays until [`take`]).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// While collection is on, timed ops and [`wait`] wait for `device` (None: they do not).
pub fn wait_for(device: Option<Device>) {
    *WAIT_FOR.lock().unwrap_or_else(|e| e.into_inner()) = device;
}

/// While collection is on, waits until the device named by [`wait_for`] has finished its queued
/// work (a device error shows up at the next op instead).
pub fn wait() {
    if !enabled() {
        return;
    }
    if let Some(device) = WAIT_FOR.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = device.synchronize();
    }
}

/// What was collected since the last call, by (op name, pass); the table starts empty again.
pub fn take() -> BTreeMap<(&'static str, Pass), OpStats> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `f()`, timed as `name`'s `pass` when collection is on.
pub(crate) fn timed<R>(name: &'static str, pass: Pass, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    wait();
    let started = Instant::now();
    let out = f();
    wait();
    let seconds = started.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let s = table.entry((name, pass)).or_default();
    s.calls += 1;
    s.seconds += seconds;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_only_while_enabled_and_take_resets() {
        // One test touches the global table, so the assertions do not race other tests' ops
        // (which run while it is off).
        enable(false);
        take();
        assert_eq!(timed("op", Pass::Forward, || 7), 7);
        assert!(take().is_empty());
        enable(true);
        timed("op", Pass::Forward, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        timed("op", Pass::Forward, || ());
        timed("op", Pass::Backward, || ());
        enable(false);
        let t = take();
        let fwd = t[&("op", Pass::Forward)];
        assert_eq!(fwd.calls, 2);
        assert!(fwd.seconds >= 0.002, "{fwd:?}");
        assert_eq!(t[&("op", Pass::Backward)].calls, 1);
    }
}
