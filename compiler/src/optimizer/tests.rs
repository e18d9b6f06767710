use crate::optimizer::*;

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{got:?} != {want:?}");
    }
}

/// One step of `opt` on a two-element parameter named `name`; the parameter and slots after.
fn step(opt: &Optimizer, name: &str, p: [f32; 2], g: [f32; 2], slots: Vec<Vec<f32>>) -> ([f32; 2], Vec<Vec<f32>>) {
    let (mut p, mut slots) = (p, slots);
    let state: Vec<f32> = opt.initial_state().iter().map(|s| s.1).collect();
    opt.apply(name, &[2], &mut p, &g, &mut slots, &state);
    (p, slots)
}

#[test]
fn one_step_of_each_rule() {
    let g = [0.5f32, -2.0];
    let (p, _) = step(&Optimizer::sgd(0.1), "fc/kernel", [1.0, 1.0], g, vec![]);
    assert_eq!(p, [0.95, 1.2]);

    let (p, slots) = step(&Optimizer::momentum(0.1, 0.9), "fc/kernel", [1.0, 1.0], g, vec![vec![1.0, 0.0]]);
    assert_eq!(slots[0], vec![1.4, -2.0]);
    assert_eq!(p, [1.0 - 0.1 * 1.4, 1.2]);

    // Adam's first step moves each parameter by about lr, whatever the gradient's scale.
    let opt = Optimizer::parse("adam", 0.001).unwrap();
    let mut state: Vec<f32> = opt.initial_state().iter().map(|s| s.1).collect();
    let (mut p, mut slots) = ([1.0f32, 1.0], vec![vec![0.0; 2], vec![0.0; 2]]);
    opt.apply("w", &[2], &mut p, &g, &mut slots, &state);
    assert!((p[0] - 0.999).abs() < 1e-6 && (p[1] - 1.001).abs() < 1e-6, "{p:?}");
    opt.advance(&mut state);
    assert_eq!(state, vec![0.9 * 0.9, 0.999 * 0.999]);

    // RMSProp: ms from 1 (TF's start) to 1 + (g² - 1)·0.1; mom = 0.01·g / sqrt(ms + 1e-10).
    let opt = Optimizer::rmsprop(0.01);
    assert_eq!(opt.slots(), ["rms", "momentum"]);
    assert_eq!((opt.slot_initial_value("rms"), opt.slot_initial_value("momentum")), (1.0, 0.0));
    let (p, slots) = step(&opt, "fc/kernel", [1.0, 1.0], g, vec![vec![1.0; 2], vec![0.0; 2]]);
    close(&slots[0], &[0.925, 1.3]);
    close(&slots[1], &[0.005 / 0.925f32.sqrt(), -0.02 / 1.3f32.sqrt()]);
    close(&p, &[1.0 - 0.005 / 0.925f32.sqrt(), 1.0 + 0.02 / 1.3f32.sqrt()]);
}

#[test]
fn nesterov_follows_tensorflows_kernel() {
    let opt = Optimizer::nesterov(0.1, 0.9);
    assert_eq!(opt.name(), "nesterov");
    let (p, slots) = step(&opt, "fc/kernel", [1.0, 1.0], [0.5, -2.0], vec![vec![1.0, 0.0]]);
    // v = 0.9·v + g; p -= g·lr + v·0.9·lr: 1 - (0.05 + 0.126), 1 - (-0.2 - 0.18).
    assert_eq!(slots[0], vec![1.4, -2.0]);
    close(&p, &[0.824, 1.38]);
    // In TF's order of f32 operations, bit for bit.
    let want = |g: f32, v: f32| 1.0 - (g * 0.1 + v * 0.9 * 0.1);
    assert_eq!(p, [want(0.5, 1.4), want(-2.0, -2.0)]);
}

#[test]
fn lars_scales_by_the_trust_ratio() {
    // ‖w‖ = 5, ‖g‖ = 1: ratio = 0.001·5 / (1 + 0.01·5) = 0.005 / 1.05.
    let opt = Optimizer::lars(0.1).with_weight_decay(0.01);
    let (p, slots) = step(&opt, "conv/kernel", [3.0, 4.0], [0.6, 0.8], vec![vec![0.0; 2]]);
    // v = (g + 0.01·w) · 0.1 · ratio = [0.63, 0.84] · 0.1 · 0.005 / 1.05 = [0.0003, 0.0004].
    close(&slots[0], &[0.0003, 0.0004]);
    close(&p, &[2.9997, 3.9996]);
    // Batch norm and biases: plain momentum at lr, no decay, as the ResNet recipe skips them.
    let (p, _) = step(&opt, "bn/gamma", [3.0, 4.0], [0.6, 0.8], vec![vec![0.0; 2]]);
    close(&p, &[2.94, 3.92]);
    // A zero norm takes a ratio of 1.
    let (p, _) = step(&opt, "conv/kernel", [0.0, 0.0], [1.0, 1.0], vec![vec![0.0; 2]]);
    close(&p, &[-0.1, -0.1]);
    // The norms' order is fixed by the rows: row sums, then their sum.
    assert_eq!(Optimizer::sum_of_squares(&[1.0, 2.0, 3.0, 4.0], 2), (1.0 + 4.0) + (9.0 + 16.0));
}

#[test]
fn weight_decay_skips_batch_norm_and_biases() {
    let opt = Optimizer::sgd(0.1).with_weight_decay(0.01);
    // g + 0.01·w = [0.51, -1.99].
    let (p, _) = step(&opt, "conv1/kernel", [1.0, 1.0], [0.5, -2.0], vec![]);
    close(&p, &[0.949, 1.199]);
    for name in ["conv1/bias", "bn1/gamma", "bn1/beta"] {
        assert!(!Optimizer::decays(name));
        let (p, _) = step(&opt, name, [1.0, 1.0], [0.5, -2.0], vec![]);
        assert_eq!(p, [0.95, 1.2], "{name}");
    }
    assert!(Optimizer::decays("fc/kernel"));
}

#[test]
fn step_decay_after_warm_up() {
    let s = Schedule::parse("warmup=4,step=10/20,factor=0.1", 0.1).unwrap();
    let rates: Vec<f32> = [0, 1, 2, 3, 4, 9, 10, 19, 20, 1000].iter().map(|&t| s.rate(t)).collect();
    close(&rates[..4], &[0.0, 0.025, 0.05, 0.075]);
    assert_eq!(&rates[4..], &[0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 * 0.1, 0.1 * 0.1 * 0.1]);
    // The schedule's step is optimizer state, advanced with it.
    let opt = Optimizer::momentum(0.1, 0.9).with_schedule(s);
    let mut state: Vec<f32> = opt.initial_state().iter().map(|s| s.1).collect();
    assert_eq!(opt.initial_state(), vec![(STEP, 0.0)]);
    for _ in 0..10 {
        opt.advance(&mut state);
    }
    assert_eq!((state.clone(), opt.rate(&state)), (vec![10.0], 0.1 * 0.1));
    assert!(Optimizer::sgd(0.1).initial_state().is_empty(), "a constant rate needs no step");
}

#[test]
fn polynomial_and_cosine_decay() {
    // (0.1 - 0.0001)·(1 - t/10)² + 0.0001.
    let s = Schedule::parse("warmup=2,poly=10,end=0.0001,power=2", 0.1).unwrap();
    close(&[s.rate(1), s.rate(2), s.rate(5)], &[0.05, 0.0999 * 0.64 + 0.0001, 0.0999 * 0.25 + 0.0001]);
    assert_eq!((s.rate(10), s.rate(50)), (0.0001, 0.0001), "the end rate from the last decay step");
    let linear = Schedule::parse("poly=10", 0.1).unwrap();
    close(&[linear.rate(0), linear.rate(5)], &[0.1, 0.0999 * 0.5 + 0.0001]);

    let s = Schedule::parse("cosine=100,alpha=0.0", 0.1).unwrap();
    assert_eq!(s.rate(0), 0.1);
    close(&[s.rate(25), s.rate(50), s.rate(100), s.rate(500)], &[0.05 * (1.0 + 0.5f32.sqrt()), 0.05, 0.0, 0.0]);
    let s = Schedule::parse("warmup=10,cosine=100,alpha=0.1", 0.1).unwrap();
    close(&[s.rate(5), s.rate(50), s.rate(100)], &[0.05, 0.1 * (0.9 * 0.5 + 0.1), 0.01]);
}

#[test]
fn schedules_read_back_what_they_print() {
    for spec in
        ["constant", "warmup=5", "warmup=5,step=10/20,factor=0.5", "poly=7,end=0,power=2", "cosine=9,alpha=0.25"]
    {
        let s = Schedule::parse(spec, 0.5).unwrap();
        assert_eq!(Schedule::parse(&s.to_string(), 0.5).unwrap(), s, "{spec}");
    }
    assert!(Schedule::parse("constant", 0.5).unwrap().is_constant());
}

#[test]
fn bad_settings_are_refused() {
    let err = |r: Result<Schedule>| r.unwrap_err().to_string();
    assert!(Optimizer::parse("adagrad", 0.1).unwrap_err().to_string().contains("nesterov, adam, rmsprop or lars"));
    assert!(Optimizer::parse("sgd", 0.0).unwrap_err().to_string().contains("positive"));
    let e = Optimizer::momentum(0.1, 1.0).check().unwrap_err();
    assert!(e.to_string().contains("[0, 1)"));
    let e = Optimizer::sgd(0.1).with_weight_decay(-1.0).check().unwrap_err().to_string();
    assert!(e.contains("weight decay -1"), "{e}");
    let e = Optimizer::new(Rule::Lars { momentum: 0.9, eta: 0.0, epsilon: 0.0 }, 0.1).check().unwrap_err();
    assert!(e.to_string().contains("eta 0 > 0"), "{e}");

    for (spec, says) in [
        ("", "is not key=value"),
        ("linear", "is not key=value"),
        ("warmup=abc", "warmup=abc is not a whole number"),
        ("decay=5", "unknown key 'decay'"),
        ("step=300/200", "300 then 200 must increase"),
        ("warmup=500,step=300", "300 falls within the 500-step warm-up"),
        ("step=100,alpha=0.1", "alpha belongs to cosine"),
        ("step=10,cosine=20", "step and cosine each set a decay"),
        ("warmup=1,warmup=2", "warmup is given twice"),
        ("warmup=0", "no warm-up and no decay"),
        ("poly=0", "over 0 steps: give at least 1"),
        ("poly=10,power=-1", "power -1"),
        ("cosine=100,alpha=2", "alpha 2"),
        ("step=100,factor=0", "factor 0"),
        ("cosine=20000000", "2^24"),
    ] {
        let e = err(Schedule::parse(spec, 0.1));
        assert!(e.contains(says), "{spec}: {e}");
    }
    assert!(err(Schedule::parse("cosine=10", f32::NAN)).contains("learning rate NaN"));
}
