//! Device selection: `auto`, `cpu`, `cuda` or `cuda:N`.

use candle_core::Device;

/// A parsed device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

/// Parses a device string, with a message listing the valid forms on error.
pub fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    match s {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" => Ok(DeviceRequest::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceRequest::Cuda)
            .ok_or_else(|| {
                format!(
                    "unknown device `{s}`; valid choices: \"auto\", \"cpu\", \"cuda\", \"cuda:N\""
                )
            }),
    }
}

/// [`parse_device`] where plain `cuda` means CUDA device `gpu`.
pub fn parse_device_at(s: &str, gpu: usize) -> Result<DeviceRequest, String> {
    Ok(match (parse_device(s)?, s) {
        (DeviceRequest::Cuda(_), "cuda") => DeviceRequest::Cuda(gpu),
        (r, _) => r,
    })
}

/// Opens the requested device. `auto` picks CUDA device 0 when kiln was built with `--features
/// cuda` and a GPU is present, the CPU otherwise.
pub fn open_device(s: &str) -> anyhow::Result<Device> {
    open_device_at(s, 0)
}

/// [`open_device`] where `cuda` and `auto` mean CUDA device `gpu` (a data-parallel rank's own
/// GPU); `cuda:N` stays device N.
pub fn open_device_at(s: &str, gpu: usize) -> anyhow::Result<Device> {
    match parse_device_at(s, gpu).map_err(anyhow::Error::msg)? {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = new_cuda(gpu) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        DeviceRequest::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device `{s}` requested but this kiln was built without CUDA; \
                     rebuild with `cargo build --release --features cuda` or use --device cpu"
                );
            }
            new_cuda(n).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open CUDA device {n}: {e}; check `nvidia-smi` or use --device cpu"
                )
            })
        }
    }
}

/// CUDA device `n`. cudarc can panic, instead of returning an error, when the driver library
/// cannot be loaded (a CUDA build on a machine without the NVIDIA driver): that becomes an error.
fn new_cuda(n: usize) -> Result<Device, String> {
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(d)) => {
            single_stream(&d);
            Ok(d)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the CUDA driver library (libcuda.so.1) could not be loaded".into()),
    }
}

/// Turns off cudarc's event tracking for buffers allocated from now on: with it, every
/// allocation creates two CUDA events (and every free destroys them) so that uses on different
/// streams can be ordered. kiln runs every kernel, copy, cuBLAS and NCCL call on the device's
/// one stream, where the stream's own order already holds. `KILN_CUDA_EVENT_TRACKING=1` keeps
/// it on (to compare).
fn single_stream(d: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = d {
        if std::env::var("KILN_CUDA_EVENT_TRACKING").is_ok_and(|v| v.trim() == "1") {
            return;
        }
        // SAFETY: cudarc needs its events only when one buffer is used on several streams;
        // kiln uses the device's single stream for all work (see above).
        unsafe { cuda.disable_event_tracking() }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = d;
}

/// A short human name for a device (for logs and summaries).
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Memory a new allocation on `d` can count on, in bytes: `MemAvailable` of /proc/meminfo on
/// the CPU, the driver's free memory on a GPU. `None` where it cannot be read.
pub fn available_memory(d: &Device) -> Option<u64> {
    match d {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(c) => {
            let (free, _total) = c.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ranks_gpu_replaces_only_the_plain_cuda() {
        assert_eq!(parse_device_at("cuda", 3), Ok(DeviceRequest::Cuda(3)));
        assert_eq!(parse_device_at("cuda:1", 3), Ok(DeviceRequest::Cuda(1)));
        assert_eq!(parse_device_at("cpu", 3), Ok(DeviceRequest::Cpu));
        assert_eq!(parse_device_at("auto", 3), Ok(DeviceRequest::Auto));
        assert!(parse_device_at("gpu", 3).unwrap_err().contains("cuda:N"));
        assert_eq!(parse_device("cuda"), Ok(DeviceRequest::Cuda(0)));
    }
}
