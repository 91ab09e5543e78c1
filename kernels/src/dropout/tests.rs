use super::*;

/// Random123's `tests/kat_vectors`, the three `philox4x32 10` lines (counter, key, output).
#[test]
fn philox_matches_the_known_answers() {
    let cases = [
        (
            [0u32; 4],
            [0u32; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in cases {
        assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
    }
}

#[test]
fn drops_and_rescales() {
    let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
    let rng = SharedRng::new(0, "dropout");
    let y: Vec<f32> = dropout(&x, 0.25, &rng).unwrap().to_vec1().unwrap();
    let zeros = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
    let mean = y.iter().sum::<f32>() / y.len() as f32;
    assert!((mean - 1.0).abs() < 0.03);
    assert_eq!(rng.position(), 10_000);
    let same: Vec<f32> = dropout(&x, 0.0, &rng).unwrap().to_vec1().unwrap();
    assert_eq!(same, vec![1.0; 10_000]);
    assert_eq!(rng.position(), 10_000, "p = 0 draws nothing");
}

#[test]
fn a_mask_is_a_function_of_key_and_position() {
    let shape = Shape::from((3, 333));
    let mask = |key, start| -> Vec<f32> {
        dropout_mask(&shape, DType::F32, &Device::Cpu, 0.5, key, start)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let a = mask([1, 2], 8);
    assert_eq!(a, mask([1, 2], 8), "same key and position, same mask");
    assert_ne!(a, mask([1, 3], 8), "another key");
    // Position 8 + 4 is where the mask from 8 continues after one block.
    assert_eq!(a[4..], mask([1, 2], 12)[..a.len() - 4]);
    // Replaying a stream: rewinding the position gives the same draws again.
    let rng = SharedRng::new(3, "dropout");
    let x = Tensor::ones((7, 9), DType::F32, &Device::Cpu).unwrap();
    let first = dropout(&x, 0.3, &rng).unwrap();
    let second = dropout(&x, 0.3, &rng).unwrap();
    rng.set_position(0);
    let replay = dropout(&x, 0.3, &rng).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&first), v(&replay));
    assert_ne!(v(&first), v(&second));
}

#[test]
fn every_dtype_draws_the_same_mask() {
    let shape = Shape::from(1001);
    let m = |dtype| {
        dropout_mask(&shape, dtype, &Device::Cpu, 0.1, [7, 9], 4)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let f32_mask = m(DType::F32);
    for dtype in [DType::F64, DType::BF16, DType::F16] {
        let other = m(dtype);
        for (a, b) in f32_mask.iter().zip(&other) {
            assert_eq!(*a == 0.0, *b == 0.0, "{dtype:?}");
            assert!((a - b).abs() <= 1e-2 * a.abs(), "{dtype:?}: {a} vs {b}");
        }
    }
}

#[test]
fn gradient_is_the_same_mask() {
    let x = candle_core::Var::from_tensor(
        &Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap(),
    )
    .unwrap();
    let rng = SharedRng::new(1, "dropout");
    let y = dropout(x.as_tensor(), 0.5, &rng).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let g = g
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mask = dropout_mask(
        &Shape::from((8, 8)),
        DType::F32,
        &Device::Cpu,
        0.5,
        rng.key(),
        0,
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    assert_eq!(g, mask);
}

#[test]
fn bad_probability_and_position_are_errors() {
    let s = Shape::from(4);
    let e = dropout_mask(&s, DType::F32, &Device::Cpu, 1.0, [0, 0], 0).unwrap_err();
    assert!(e.to_string().contains("not in [0, 1)"), "{e}");
    let e = dropout_mask(&s, DType::F32, &Device::Cpu, 0.5, [0, 0], 2).unwrap_err();
    assert!(e.to_string().contains("multiple of 4"), "{e}");
}

#[test]
fn in_op_draws_are_the_mask_from_any_element() {
    let draw = Draw {
        p: 0.3,
        key: [7, 9],
        start: 40,
    };
    let n = 203;
    let mask: Vec<f32> = dropout_mask(&Shape::from(n), DType::F32, &Device::Cpu, 0.3, [7, 9], 40)
        .unwrap()
        .to_vec1()
        .unwrap();
    let spec = draw.spec().unwrap();
    // Runs starting inside a Philox block and crossing several, as attention's rows do.
    for (e0, len) in [(0, n), (1, 6), (3, 2), (5, 100), (202, 1)] {
        let mut got = vec![-1.0f32; len];
        spec.fill(e0 as u64, &mut got);
        assert_eq!(got, mask[e0..e0 + len], "elements {e0}..{}", e0 + len);
    }
    let mut wide = vec![-1.0f64; 9];
    spec.fill(11, &mut wide);
    let want: Vec<f64> = mask[11..20].iter().map(|&m| f64::from(m)).collect();
    assert_eq!(wide, want, "f64 multipliers are the f32 ones widened");
    let bad = Draw { start: 42, ..draw }.spec().unwrap_err();
    assert!(bad.to_string().contains("not a multiple of 4"), "{bad}");
    let bad = Draw { p: 1.0, ..draw }.spec().unwrap_err();
    assert!(bad.to_string().contains("not in [0, 1)"), "{bad}");
    let rng = SharedRng::new(3, "attention");
    assert_eq!(Draw::reserve(0.0, 100, &rng), None);
    assert_eq!(rng.position(), 0, "p = 0 reserves nothing");
    let d = Draw::reserve(0.1, 100, &rng).unwrap();
    assert_eq!((d.start, rng.position()), (0, 100));
}
