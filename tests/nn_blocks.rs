//! The LoRA-ready blocks equal Burn's blocks, load Burn's checkpoints, and adapt on the fast
//! path.

mod common;

use burn::module::Module;
use burn::nn::attention::{
    CrossAttentionConfig, MhaInput as BurnMhaInput, MultiHeadAttentionConfig,
    generate_autoregressive_mask,
};
use burn::nn::transformer::{
    PositionWiseFeedForwardConfig, TransformerDecoderConfig,
    TransformerDecoderInput as BurnDecoderInput, TransformerEncoderConfig,
    TransformerEncoderInput as BurnEncoderInput,
};
use burn::nn::{RotaryEncodingConfig, SwiGluConfig};
use burn::prelude::*;
use burn::tensor::{Bool, Distribution, TensorData};
use burn_lora::nn::{
    GroupedQueryAttention, GroupedQueryAttentionConfig, MhaInput, MultiHeadAttention,
    PositionWiseFeedForward, RotaryConfig, RotaryLayout, SwiGlu, TransformerDecoder,
    TransformerDecoderInput, TransformerEncoder, TransformerEncoderInput,
};
use burn_lora::{LoraConfig, LoraLinear, LoraModule, Targets};
use common::{HostTensor, devices, param_ids, randomize};

fn input(device: &Device) -> Tensor<3> {
    Tensor::random([2, 7, 32], Distribution::Normal(0.0, 1.0), device)
}

/// Pad the last two positions of the second sequence.
fn mask_pad(device: &Device) -> Tensor<2, Bool> {
    Tensor::<2, Int>::from_data([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]], device).bool()
}

#[test]
fn attention_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for quiet_softmax in [false, true] {
            device.seed(20);
            let burn = MultiHeadAttentionConfig::new(32, 4)
                .with_quiet_softmax(quiet_softmax)
                .init(&device);
            let ours = MultiHeadAttention::from(burn.clone());
            let (q, kv) = (input(&device), input(&device));
            let expected = burn.forward(
                BurnMhaInput::new(q.clone(), kv.clone(), kv.clone()).mask_pad(mask_pad(&device)),
            );
            let found = ours.forward(MhaInput::new(q, kv.clone(), kv).mask_pad(mask_pad(&device)));
            assert_eq!(
                found.context.into_data(),
                expected.context.into_data(),
                "{name}"
            );
            assert_eq!(
                found.weights.into_data(),
                expected.weights.into_data(),
                "{name}"
            );
        }
    }
}

#[test]
fn feed_forward_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        device.seed(21);
        let burn = PositionWiseFeedForwardConfig::new(32, 64).init(&device);
        let ours = PositionWiseFeedForward::from(burn.clone());
        let x = input(&device);
        assert_eq!(
            ours.forward(x.clone()).into_data(),
            burn.forward(x).into_data(),
            "{name}"
        );
    }
}

fn encoder_config(norm_first: bool) -> TransformerEncoderConfig {
    TransformerEncoderConfig::new(32, 64, 4, 2).with_norm_first(norm_first)
}

#[test]
fn the_encoder_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for norm_first in [false, true] {
            device.seed(22);
            let burn = encoder_config(norm_first).init(&device);
            let ours = TransformerEncoder::from(burn.clone());
            let x = input(&device);
            let expected =
                burn.forward(BurnEncoderInput::new(x.clone()).mask_pad(mask_pad(&device)));
            let found = ours.forward(TransformerEncoderInput::new(x).mask_pad(mask_pad(&device)));
            assert_eq!(
                found.into_data(),
                expected.into_data(),
                "{name}, norm_first {norm_first}"
            );
        }
    }
}

#[test]
fn the_encoder_loads_a_checkpoint_saved_from_burns() {
    let device = Device::flex();
    device.seed(23);
    let burn = encoder_config(false).init(&device);
    let path = std::env::temp_dir().join(format!("burn-lora-encoder-{}.bpk", std::process::id()));
    burn.clone().save_file(&path).unwrap();

    device.seed(24);
    let fresh = TransformerEncoder::from(encoder_config(false).init(&device));
    let loaded = fresh.try_load_file(&path).unwrap();
    let x = input(&device);
    let expected = burn.forward(BurnEncoderInput::new(x.clone()));
    let found = loaded.forward(TransformerEncoderInput::new(x));
    assert_eq!(found.into_data(), expected.into_data());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn adapted_blocks_take_the_fast_path_and_equal_the_dense_path() {
    for (name, device) in devices() {
        device.seed(25);
        let burn = encoder_config(false).with_dropout(0.0).init(&device);
        let ours = TransformerEncoder::from(burn.clone());
        let config = LoraConfig::new(4).with_targets(Targets::attention());
        let x = input(&device);
        let base = burn.forward(BurnEncoderInput::new(x.clone()));

        let (burn, dense_report) = config.apply(burn).unwrap();
        let burn = randomize(burn, "lora_b", 0.2);
        let (ours, fast_report) = config.apply(ours).unwrap();
        // The adapted blocks share every parameter path, adapters included, so Burn's adapted
        // record loads into ours: both now hold the same A and B.
        let ours = ours.load_record(burn.clone().into_record());

        assert_eq!(dense_report.layers.len(), 8);
        assert!(dense_report.layers.iter().all(|layer| !layer.fast_path));
        assert!(fast_report.layers.iter().all(|layer| layer.fast_path));

        let dense = burn.forward(BurnEncoderInput::new(x.clone()));
        let fast = ours.forward(TransformerEncoderInput::new(x));
        let flat = |t: Tensor<3>| HostTensor::from(t.reshape([14, 32]));
        let (fast, dense) = (flat(fast), flat(dense));
        let moved = dense.error_vs_max(&flat(base));
        assert!(
            moved > 1e-3,
            "{name}: the adapters change the output ({moved:e})"
        );
        let error = fast.error_vs_max(&dense);
        assert!(error < 1e-5, "{name}: fast vs dense {error:e}");
    }
}

#[test]
fn swiglu_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for bias in [false, true] {
            device.seed(26);
            let burn = SwiGluConfig::new(32, 48).with_bias(bias).init(&device);
            let ours = SwiGlu::from(burn.clone());
            assert_eq!(
                param_ids(&ours),
                param_ids(&burn),
                "{name}: parameter paths"
            );
            let x = input(&device);
            assert_eq!(
                ours.forward(x.clone()).into_data(),
                burn.forward(x).into_data(),
                "{name}, bias {bias}"
            );
        }
    }
}

fn decoder_config(norm_first: bool) -> TransformerDecoderConfig {
    TransformerDecoderConfig::new(32, 64, 4, 2).with_norm_first(norm_first)
}

/// A target of 7 positions, causally masked, over a memory of 5 positions whose last one is
/// padding in the second sequence.
fn decoder_inputs(device: &Device) -> (BurnDecoderInput, TransformerDecoderInput) {
    let target = input(device);
    let memory = Tensor::<3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), device);
    let causal = generate_autoregressive_mask(2, 7, device);
    let memory_pad = Tensor::<2, Int>::from_data([[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], device).bool();
    let burn = BurnDecoderInput::new(target.clone(), memory.clone())
        .target_mask_attn(causal.clone())
        .memory_mask_pad(memory_pad.clone());
    let ours = TransformerDecoderInput::new(target, memory)
        .target_mask_attn(causal)
        .memory_mask_pad(memory_pad);
    (burn, ours)
}

#[test]
fn the_decoder_equals_burns_bit_for_bit() {
    for (name, device) in devices() {
        for norm_first in [false, true] {
            device.seed(27);
            let burn = decoder_config(norm_first).init(&device);
            let ours = TransformerDecoder::from(burn.clone());
            assert_eq!(
                param_ids(&ours),
                param_ids(&burn),
                "{name}: parameter paths"
            );
            let (burn_input, our_input) = decoder_inputs(&device);
            assert_eq!(
                ours.forward(our_input.clone()).into_data(),
                burn.forward(burn_input).into_data(),
                "{name}, norm_first {norm_first}"
            );
            // Layer by layer, as Burn's layers run: the same output.
            let (_, our_input) = decoder_inputs(&device);
            let layer_by_layer = ours
                .layers
                .iter()
                .fold(our_input.clone(), |input, layer| layer.forward(input));
            assert_eq!(
                layer_by_layer.into_target().into_data(),
                ours.forward(our_input).into_data(),
                "{name}, norm_first {norm_first}"
            );
        }
    }
}

#[test]
fn the_decoder_loads_a_checkpoint_saved_from_burns() {
    let device = Device::flex();
    device.seed(28);
    let burn = decoder_config(true).init(&device);
    let path = std::env::temp_dir().join(format!("burn-lora-decoder-{}.bpk", std::process::id()));
    burn.clone().save_file(&path).unwrap();

    device.seed(29);
    let fresh = TransformerDecoder::from(decoder_config(true).init(&device));
    let loaded = fresh.try_load_file(&path).unwrap();
    let (burn_input, our_input) = decoder_inputs(&device);
    assert_eq!(
        loaded.forward(our_input).into_data(),
        burn.forward(burn_input).into_data()
    );
    std::fs::remove_file(&path).unwrap();
}

/// Rows of a `[.., seq, d]` tensor rotated by a naive f64 RoPE: pair `(i, i + d/2)` for
/// `Halves` (Hugging Face's `rotate_half`), `(2i, 2i + 1)` for `Interleaved`.
fn naive_rope(
    x: &HostTensor,
    theta: f64,
    layout: RotaryLayout,
    position_offset: usize,
) -> HostTensor {
    let d = *x.dims.last().unwrap();
    let seq = x.dims[x.dims.len() - 2];
    let mut out = x.clone();
    for (row, chunk) in x.values.chunks(d).enumerate() {
        let position = (position_offset + row % seq) as f64;
        for i in 0..d / 2 {
            let (first, second) = match layout {
                RotaryLayout::Halves => (i, i + d / 2),
                RotaryLayout::Interleaved => (2 * i, 2 * i + 1),
            };
            let angle = position * theta.powf(-2.0 * i as f64 / d as f64);
            let (a, b) = (chunk[first], chunk[second]);
            out.values[row * d + first] = a * angle.cos() - b * angle.sin();
            out.values[row * d + second] = b * angle.cos() + a * angle.sin();
        }
    }
    out
}

#[test]
fn rope_halves_equals_a_naive_rotate_half() {
    for (name, device) in devices() {
        device.seed(30);
        let rope = RotaryConfig::new(16).with_theta(500.0).init(8, &device);
        let x = Tensor::<4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        for offset in [0, 11] {
            let found = HostTensor::from(rope.apply(x.clone(), offset));
            let expected = naive_rope(
                &HostTensor::from(x.clone()),
                500.0,
                RotaryLayout::Halves,
                offset,
            );
            let error = found.error_vs_max(&expected);
            assert!(error < 1e-6, "{name}, offset {offset}: {error:e}");
        }
    }
}

#[test]
fn rope_interleaved_equals_burns_rotary_encoding() {
    for (name, device) in devices() {
        device.seed(31);
        let burn = RotaryEncodingConfig::new(16, 8).init(&device);
        let ours = RotaryConfig::new(16)
            .with_layout(RotaryLayout::Interleaved)
            .init(8, &device);
        let x = Tensor::<4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        for offset in [0, 11] {
            let expected = HostTensor::from(burn.apply(x.clone(), offset));
            let found = HostTensor::from(ours.apply(x.clone(), offset));
            let naive = naive_rope(
                &HostTensor::from(x.clone()),
                10000.0,
                RotaryLayout::Interleaved,
                offset,
            );
            // Burn computes its table in f32, ours in f64: a few ulps of the angle apart.
            let error = found.error_vs_max(&expected);
            assert!(error < 1e-5, "{name}, offset {offset}: vs Burn {error:e}");
            let error = found.error_vs_max(&naive);
            assert!(error < 1e-6, "{name}, offset {offset}: vs naive {error:e}");
        }
    }
}

/// `x·W + b` of a `LoraLinear` in f64 on the host, through its composed weight `W + s·A·B`
/// (`Param::val`): the dense reference of the fast path.
fn naive_linear(layer: &LoraLinear, x: &HostTensor) -> HostTensor {
    let weight = HostTensor::from(layer.weight.val());
    let (d_in, d_out) = (weight.dims[0], weight.dims[1]);
    let rows = x.values.len() / d_in;
    let flat = HostTensor {
        dims: vec![rows, d_in],
        values: x.values.clone(),
    };
    let mut y = flat.matmul(&weight);
    if let Some(bias) = &layer.bias {
        y = y.add_row(&HostTensor::from(bias.val()));
    }
    let mut dims = x.dims.clone();
    *dims.last_mut().unwrap() = d_out;
    HostTensor {
        dims,
        values: y.values,
    }
}

/// Grouped-query attention with plain loops in f64: `x` is `[batch, seq, d_model]`, `mask`
/// `[batch][query][key]` true where not allowed.
fn naive_gqa(
    attention: &GroupedQueryAttention,
    x: &HostTensor,
    mask: Option<&[Vec<Vec<bool>>]>,
    rope: Option<(f64, RotaryLayout)>,
    position_offset: usize,
) -> HostTensor {
    let (batch, seq) = (x.dims[0], x.dims[1]);
    let (heads, heads_kv, d) = (attention.n_heads, attention.n_heads_kv, attention.d_head);
    let split = |layer: &LoraLinear, heads: usize| {
        split_heads(naive_linear(layer, x), batch, seq, heads, d)
    };
    let rotate = |t: HostTensor| match rope {
        Some((theta, layout)) => naive_rope(&t, theta, layout, position_offset),
        None => t,
    };
    let q = rotate(split(&attention.query, heads));
    let k = rotate(split(&attention.key, heads_kv));
    let v = split(&attention.value, heads_kv);
    let at = |t: &HostTensor, b: usize, h: usize, s: usize, i: usize| {
        t.values[((b * t.dims[1] + h) * seq + s) * d + i]
    };
    let group = heads / heads_kv;
    let mut context = vec![0.0; batch * seq * heads * d];
    for b in 0..batch {
        for h in 0..heads {
            for t in 0..seq {
                let scores: Vec<Option<f64>> = (0..seq)
                    .map(|u| {
                        let masked = mask.is_some_and(|mask| mask[b][t][u]);
                        let dot: f64 = (0..d)
                            .map(|i| at(&q, b, h, t, i) * at(&k, b, h / group, u, i))
                            .sum();
                        (!masked).then(|| dot / (d as f64).sqrt())
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |m, s| m.max(*s));
                let exps: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let sum: f64 = exps.iter().sum();
                for i in 0..d {
                    context[(b * seq + t) * heads * d + h * d + i] = (0..seq)
                        .map(|u| exps[u] / sum * at(&v, b, h / group, u, i))
                        .sum();
                }
            }
        }
    }
    let context = HostTensor {
        dims: vec![batch, seq, heads * d],
        values: context,
    };
    naive_linear(&attention.output, &context)
}

/// `[batch, seq, heads·d]` to `[batch, heads, seq, d]`.
fn split_heads(t: HostTensor, batch: usize, seq: usize, heads: usize, d: usize) -> HostTensor {
    let mut values = vec![0.0; t.values.len()];
    for b in 0..batch {
        for s in 0..seq {
            for h in 0..heads {
                for i in 0..d {
                    values[((b * heads + h) * seq + s) * d + i] =
                        t.values[(b * seq + s) * heads * d + h * d + i];
                }
            }
        }
    }
    HostTensor {
        dims: vec![batch, heads, seq, d],
        values,
    }
}

/// Causal, and in the second sequence key 1 is padding.
fn gqa_mask(device: &Device) -> (Tensor<3, Bool>, Vec<Vec<Vec<bool>>>) {
    let host: Vec<Vec<Vec<bool>>> = (0..2)
        .map(|b| {
            (0..7)
                .map(|t| (0..7).map(|u| u > t || (b == 1 && u == 1)).collect())
                .collect()
        })
        .collect();
    let flat: Vec<bool> = host.iter().flatten().flatten().copied().collect();
    let tensor = Tensor::from_data(TensorData::new(flat, [2, 7, 7]), device);
    (tensor, host)
}

fn gqa_config() -> GroupedQueryAttentionConfig {
    // d_head 6 is not d_model / n_heads: the projections are not square.
    GroupedQueryAttentionConfig::new(32, 4, 2)
        .with_d_head(Some(6))
        .with_bias(true)
        .with_rope(Some(RotaryConfig::new(16).with_theta(100.0)))
}

#[test]
fn grouped_query_attention_equals_a_naive_reference() {
    for (name, device) in devices() {
        for (heads_kv, layout) in [
            (2, RotaryLayout::Halves),
            (1, RotaryLayout::Interleaved),
            (4, RotaryLayout::Halves),
        ] {
            device.seed(32);
            let rope = RotaryConfig::new(16).with_theta(100.0).with_layout(layout);
            let attention = GroupedQueryAttentionConfig {
                n_heads_kv: heads_kv,
                ..gqa_config()
            }
            .with_rope(Some(rope))
            .init(&device);
            let x = input(&device);
            let (mask, host_mask) = gqa_mask(&device);
            for offset in [0, 5] {
                let found = attention.forward(x.clone(), Some(mask.clone()), offset);
                let expected = naive_gqa(
                    &attention,
                    &HostTensor::from(x.clone()),
                    Some(&host_mask),
                    Some((100.0, layout)),
                    offset,
                );
                let error = HostTensor::from(found).error_vs_max(&expected);
                assert!(
                    error < 1e-5,
                    "{name}, {heads_kv} kv heads, {layout:?}, offset {offset}: {error:e}"
                );
            }
        }
    }
}

#[test]
fn grouped_query_attention_without_rope_equals_burns_cross_attention() {
    for (name, device) in devices() {
        device.seed(33);
        let burn = CrossAttentionConfig::new(32, 32, 4, 2, 8)
            .with_dropout(0.0)
            .init(&device);
        device.seed(34);
        let ours = GroupedQueryAttentionConfig::new(32, 4, 2)
            .with_bias(true)
            .init(&device);
        assert_eq!(
            param_ids(&ours).keys().collect::<Vec<_>>(),
            param_ids(&burn).keys().collect::<Vec<_>>(),
            "{name}: parameter paths"
        );
        let ours = ours.load_record(burn.clone().into_record());
        let x = input(&device);
        let expected = HostTensor::from(burn.forward(x.clone(), x.clone(), None));
        let found = HostTensor::from(ours.forward(x, None, 0));
        let error = found.error_vs_max(&expected);
        assert!(error < 1e-6, "{name}: {error:e}");
    }
}

#[test]
fn a_fully_masked_query_attends_uniformly_instead_of_giving_nan() {
    let device = Device::flex();
    device.seed(35);
    let attention = gqa_config().init(&device);
    let mask =
        Tensor::<3, Bool>::from_data(TensorData::new(vec![true; 2 * 7 * 7], [2, 7, 7]), &device);
    let found = attention.forward(input(&device), Some(mask), 0);
    let finite: Vec<f32> = found.into_data().try_to_vec().unwrap();
    assert!(finite.iter().all(|v| v.is_finite()));
}

#[test]
#[should_panic(expected = "not a multiple of n_heads_kv")]
fn grouped_query_attention_refuses_uneven_groups() {
    let _ = GroupedQueryAttentionConfig::new(32, 4, 3).init(&Device::flex());
}

/// A model's attention sits under a name that says so: `Targets::attention` takes an `output`
/// layer for O only there.
#[derive(Module, Debug)]
struct Block {
    self_attn: GroupedQueryAttention,
}

fn gqa_block(device: &Device) -> Block {
    Block {
        self_attn: gqa_config().init(device),
    }
}

#[test]
fn grouped_query_attention_adapts_on_the_fast_path_and_equals_the_dense_reference() {
    for (name, device) in devices() {
        device.seed(36);
        let (block, report) = LoraConfig::new(4)
            .with_targets(Targets::attention())
            .apply(gqa_block(&device))
            .unwrap();
        let mut paths: Vec<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
        paths.sort();
        let expected = ["key", "output", "query", "value"].map(|p| format!("self_attn.{p}"));
        assert_eq!(paths, expected, "{name}");
        assert!(report.layers.iter().all(|layer| layer.fast_path), "{name}");
        // The rotary tables are constants: no parameter, no record key.
        assert!(param_ids(&block).keys().all(|path| !path.contains("rope")));

        let attention = randomize(block, "lora_b", 0.2).self_attn;
        let x = input(&device);
        let (mask, host_mask) = gqa_mask(&device);
        let found = HostTensor::from(attention.forward(x.clone(), Some(mask), 2));
        // The reference composes W + s·A·B (`Param::val`) and multiplies in f64.
        let expected = naive_gqa(
            &attention,
            &HostTensor::from(x.clone()),
            Some(&host_mask),
            Some((100.0, RotaryLayout::Halves)),
            2,
        );
        let error = found.error_vs_max(&expected);
        assert!(error < 1e-5, "{name}: fast vs dense reference {error:e}");
        let base = attention.disable_adapters().unwrap();
        let moved = HostTensor::from(base.forward(x, None, 2)).error_vs_max(&expected);
        assert!(
            moved > 1e-3,
            "{name}: the adapters change the output ({moved:e})"
        );
    }
}

/// Two adapters, "a" of rank 2 and "b" of rank 4 on fewer layers, with random `B`s.
fn two_adapters<M: Module>(module: M, a_targets: Targets, b_targets: Targets) -> M {
    let (module, _) = module
        .add_adapter("a", &LoraConfig::new(2).with_targets(a_targets))
        .unwrap();
    let (module, _) = module
        .add_adapter("b", &LoraConfig::new(4).with_targets(b_targets))
        .unwrap();
    randomize(module, "lora_b", 0.5)
}

const ROUTES: [Option<&str>; 4] = [Some("a"), None, Some("b"), Some("a")];

/// Each sample of `mixed` equals `alone(model with only its adapter active, i)`.
fn assert_each_sample_alone<M: LoraModule>(
    name: &str,
    model: &M,
    mixed: Tensor<3>,
    alone: impl Fn(&M, usize) -> Tensor<3>,
) {
    for (i, route) in ROUTES.iter().enumerate() {
        let only = match route {
            Some(adapter) => model.set_active(&[adapter]).unwrap(),
            None => model.disable_adapters().unwrap(),
        };
        let expected = HostTensor::from(alone(&only, i));
        let error = HostTensor::from(mixed.clone().narrow(0, i, 1)).error_vs_max(&expected);
        assert!(error < 1e-5, "{name}: sample {i} ({route:?}): {error:e}");
    }
}

fn everything() -> Targets {
    Targets::new(
        [
            Targets::attention().include,
            Targets::feed_forward().include,
        ]
        .concat(),
    )
}

#[test]
fn the_new_blocks_route_each_sample_of_a_mixed_batch_through_its_adapter() {
    for (name, device) in devices() {
        device.seed(37);
        let x = Tensor::<3>::random([4, 5, 32], Distribution::Normal(0.0, 1.0), &device);
        let memory = Tensor::<3>::random([4, 3, 32], Distribution::Normal(0.0, 1.0), &device);

        let swiglu = SwiGlu::from(SwiGluConfig::new(32, 16).init(&device));
        let swiglu = two_adapters(
            swiglu,
            Targets::feed_forward(),
            Targets::names(["linear_inner"]),
        );
        let batch = swiglu.mixed_batch(&ROUTES).unwrap();
        let mixed = swiglu.forward_mixed(x.clone(), &batch);
        assert_each_sample_alone(name, &swiglu, mixed, |only, i| {
            only.forward(x.clone().narrow(0, i, 1))
        });

        let decoder = TransformerDecoder::from(
            TransformerDecoderConfig::new(32, 64, 4, 2)
                .with_dropout(0.0)
                .init(&device),
        );
        let decoder = two_adapters(decoder, everything(), Targets::attention_qv());
        let batch = decoder.mixed_batch(&ROUTES).unwrap();
        let causal = generate_autoregressive_mask(4, 5, &device);
        let mixed = decoder.forward_mixed(
            TransformerDecoderInput::new(x.clone(), memory.clone()).target_mask_attn(causal),
            &batch,
        );
        assert_each_sample_alone(name, &decoder, mixed, |only, i| {
            only.forward(
                TransformerDecoderInput::new(
                    x.clone().narrow(0, i, 1),
                    memory.clone().narrow(0, i, 1),
                )
                .target_mask_attn(generate_autoregressive_mask(1, 5, &device)),
            )
        });

        let block = two_adapters(
            gqa_block(&device),
            Targets::attention(),
            Targets::attention_qv(),
        );
        let batch = block.mixed_batch(&ROUTES).unwrap();
        let causal = generate_autoregressive_mask(4, 5, &device);
        let mixed = block
            .self_attn
            .forward_mixed(x.clone(), Some(causal), 3, &batch);
        assert_each_sample_alone(name, &block, mixed, |only, i| {
            let causal = generate_autoregressive_mask(1, 5, &device);
            only.self_attn
                .forward(x.clone().narrow(0, i, 1), Some(causal), 3)
        });
    }
}
