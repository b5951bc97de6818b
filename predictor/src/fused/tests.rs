//! The fused operations against Burn's own, values and gradients.

use super::kernels::exp;
use super::*;
use crate::model::seeded;
use burn::tensor::{Distribution, TensorData};

fn close(a: Tensor<4>, b: Tensor<4>, tol: f32, what: &str) {
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // Burn's softmax is NaN on a fully masked row, where the fused one is 0.
        let ok = if y.is_nan() {
            *x == 0.0
        } else {
            (x - y).abs() <= tol * (1.0 + y.abs())
        };
        assert!(ok, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn exp_is_within_a_few_ulp() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (exp(x) as f64, (x as f64).exp());
        assert!(
            ((got - want) / want).abs() < 4e-7,
            "exp({x}) = {got}, want {want}"
        );
        x += 0.0137;
    }
    assert_eq!(exp(-90.0), 0.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
}

/// Values and input gradients of the fused operations equal Burn's own, including
/// masked keys and a fully masked row (zeros, not NaN).
#[test]
fn fused_ops_match_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    let (x, w) = seeded(&device, 5, || {
        (
            Tensor::<4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 4.0), &device),
            Tensor::<4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 1.0), &device),
        )
    });
    let mut bias: Vec<f32> = (0..3 * 5 * 7).map(|i| (i % 5) as f32 * -0.3).collect();
    bias[8] = f32::NEG_INFINITY;
    bias[7..14].iter_mut().for_each(|b| *b = f32::NEG_INFINITY);
    let bias = Tensor::<4>::from_data(TensorData::new(bias, [1, 3, 5, 7]), &device);
    let grad_of = |f: &dyn Fn(Tensor<4>) -> Tensor<4>| {
        let x = x.clone().require_grad();
        let y = f(x.clone());
        let grads = (y.clone() * w.clone()).sum().backward();
        (y.inner(), x.grad(&grads).unwrap())
    };
    let (y, g) = grad_of(&|x| silu(x));
    let (y_ref, g_ref) = grad_of(&|x| burn::tensor::activation::silu(x));
    close(y, y_ref, 1e-5, "silu");
    close(g, g_ref, 1e-5, "silu grad");
    let (y, g) = grad_of(&|x| softmax_with_bias(x, bias.clone()));
    let plain =
        |x: Tensor<4>| burn::tensor::activation::softmax(x + bias.clone().expand([2, 3, 5, 7]), 3);
    let (y_ref, g_ref) = grad_of(&plain);
    close(y.clone(), y_ref, 1e-5, "softmax");
    close(g, g_ref, 1e-5, "softmax grad");
    let row = y
        .slice([0..1, 0..1, 1..2, 0..7])
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(row, vec![0.0; 7]);
}

#[test]
fn fused_attention_matches_burn() {
    let device = Device::flex().autodiff();
    let qkv: Vec<Tensor<4>> = seeded(&device, 6, || {
        (0..3)
            .map(|_| {
                Tensor::random([2, 4, 6, 8], Distribution::Normal(0.0, 1.0), &device).require_grad()
            })
            .collect()
    });
    let bias: Vec<f32> = (0..4 * 36)
        .map(|i| {
            let (q, k) = ((i / 6) % 6, i % 6);
            if k > q {
                f32::NEG_INFINITY
            } else {
                -0.25 * (q - k) as f32
            }
        })
        .collect();
    let bias = Tensor::<4>::from_data(TensorData::new(bias, [1, 4, 6, 6]), &device);
    let run = |fused: bool| {
        let (q, k, v) = (qkv[0].clone(), qkv[1].clone(), qkv[2].clone());
        let y = if fused {
            attention(q, k, v, bias.clone())
        } else {
            burn::tensor::module::attention(
                q,
                k,
                v,
                None,
                Some(bias.clone().expand([2, 4, 6, 6])),
                burn::tensor::ops::AttentionModuleOptions::default(),
            )
        };
        let grads = (y.clone() * y.clone()).sum().backward();
        let g: Vec<Tensor<4>> = qkv.iter().map(|t| t.grad(&grads).unwrap()).collect();
        (y.inner(), g)
    };
    let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
    close(y, y_ref, 1e-5, "attention");
    for (i, (a, b)) in g.into_iter().zip(g_ref).enumerate() {
        close(a, b, 1e-4, &format!("attention grad {i}"));
    }
}

#[test]
fn fused_layer_norm_matches_burn() {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    let device = Device::flex().autodiff();
    let mut norm = LayerNormConfig::new(24)
        .with_epsilon(LAYER_NORM_EPS)
        .init(&device);
    let (gamma, beta, x, w) = seeded(&device, 7, || {
        (
            Tensor::random([24], Distribution::Normal(1.0, 0.5), &device),
            Tensor::random([24], Distribution::Normal(0.0, 0.5), &device),
            Tensor::<4>::random([2, 3, 5, 24], Distribution::Normal(0.5, 3.0), &device),
            Tensor::<4>::random([2, 3, 5, 24], Distribution::Normal(0.0, 1.0), &device),
        )
    });
    norm.gamma = Param::from_tensor(gamma);
    norm.beta = Some(Param::from_tensor(beta));
    let run = |fused: bool| {
        let x = x.clone().require_grad();
        let y = if fused {
            layer_norm(&norm, x.clone())
        } else {
            norm.forward(x.clone())
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        let beta = norm.beta.as_ref().unwrap();
        let params = [norm.gamma.grad(&grads).unwrap(), beta.grad(&grads).unwrap()];
        (
            y.inner(),
            x.grad(&grads).unwrap(),
            params.map(|p| p.reshape([1, 1, 1, 24])),
        )
    };
    let ((y, g, [dg, db]), (y_ref, g_ref, [dg_ref, db_ref])) = (run(true), run(false));
    close(y, y_ref, 1e-5, "layer norm");
    close(g, g_ref, 1e-4, "layer norm grad x");
    close(dg, dg_ref, 1e-4, "layer norm grad gamma");
    close(db, db_ref, 1e-4, "layer norm grad beta");
}
