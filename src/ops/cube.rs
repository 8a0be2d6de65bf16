//! The fused LoRA linear on CubeCL backends (wgpu): Burn's own matrix product writes `p·q`,
//! then one kernel adds `alpha·r·t` and the bias to it in place.
//!
//! The low-rank term has `r` (the LoRA rank) products per output entry, so the kernel reads
//! and writes the output once and never materializes `r·t`: the composed path writes that
//! product into a second output-sized buffer and adds the two.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::untile;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, ir::AddressType};

use super::extension::{LoraOps, Optional, matmul_sum_composed};

/// `output += alpha·r·t (+ bias)`, one thread per output entry, every operand read through its
/// strides. The sum runs in f32 whatever the operands' float type, so an f16 or bf16 output is
/// rounded once.
#[cube(launch, address_type = "dynamic")]
fn add_low_rank<F: Float>(
    output: &mut Tensor<F>,
    r: &Tensor<F>,
    t: &Tensor<F>,
    bias: &Tensor<F>,
    alpha: InputScalar,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: ElemType,
) {
    let columns = output.shape(1);
    if ABSOLUTE_POS >= output.shape(0) * columns {
        terminate!();
    }
    let row = ABSOLUTE_POS / columns;
    let column = ABSOLUTE_POS % columns;
    let mut sum = f32::new(0.0);
    for k in 0..r.shape(1) {
        let left = f32::cast_from(r[row * r.stride(0) + k * r.stride(1)]);
        let right = f32::cast_from(t[k * t.stride(0) + column * t.stride(1)]);
        sum += left * right;
    }
    let position = row * output.stride(0) + column * output.stride(1);
    let mut value = f32::cast_from(output[position]) + alpha.get::<f32>() * sum;
    if has_bias {
        value += f32::cast_from(bias[column * bias.stride(0)]);
    }
    output[position] = F::cast_from(value);
}

impl LoraOps for CubeBackend {
    fn matmul_sum(
        p: CubeTensor,
        q: CubeTensor,
        r: CubeTensor,
        t: CubeTensor,
        bias: Optional<Self>,
        alpha: f64,
    ) -> CubeTensor {
        let bias = bias.into_option();
        let operands = [Some(&p), Some(&q), Some(&r), Some(&t), bias.as_ref()];
        let dtype = p.dtype;
        let served = matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            && operands
                .iter()
                .flatten()
                .all(|tensor| tensor.dtype == dtype);
        if !served {
            return matmul_sum_composed::<Self>(p, q, r, t, bias, alpha);
        }
        let product = Self::float_matmul(p, q);
        add_low_rank_in_place(product, r, t, bias, alpha)
    }
}

/// Launches [`add_low_rank`] on `output` (`[m, n]`, written in place when nothing else holds
/// it), with `r: [m, k]`, `t: [k, n]` and `bias: [n]`.
fn add_low_rank_in_place(
    output: CubeTensor,
    r: CubeTensor,
    t: CubeTensor,
    bias: Option<CubeTensor>,
    alpha: f64,
) -> CubeTensor {
    let mut output = untile(output);
    let (rows, columns, rank) = (
        output.meta.shape()[0],
        output.meta.shape()[1],
        r.meta.shape()[1],
    );
    let elements = rows * columns;
    if elements == 0 {
        return output;
    }
    if rank == 0 {
        // No low-rank term (a base-only product): at most the bias to add.
        return match bias {
            Some(bias) => {
                let bias = CubeBackend::float_reshape(bias, Shape::new([1, columns]));
                CubeBackend::float_add(output, bias)
            }
            None => output,
        };
    }
    if !output.can_mut() {
        output = output.copy();
    }
    let (r, t, bias) = (untile(r), untile(t), bias.map(untile));
    let client = output.client.clone();
    let address = [&output, &r, &t]
        .into_iter()
        .chain(bias.as_ref())
        .map(CubeTensor::required_address_type)
        .max()
        .unwrap_or(AddressType::default());
    let dtype = dtype_to_storage_type(output.dtype);
    let cube_dim = CubeDim::new(&client, elements);
    let cube_count = calculate_cube_count_elemwise(&client, elements, cube_dim);
    let has_bias = bias.is_some();
    // Without a bias the kernel never reads its bias operand; `t` stands in for it.
    let bias = bias.unwrap_or_else(|| t.clone());
    add_low_rank::launch(
        &client,
        cube_count,
        cube_dim,
        address,
        output.clone().into_tensor_arg(),
        r.into_tensor_arg(),
        t.into_tensor_arg(),
        bias.into_tensor_arg(),
        InputScalar::new(alpha, dtype_to_storage_type(DType::F32)),
        has_bias,
        dtype,
    );
    output
}
