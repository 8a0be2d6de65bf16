//! The backend extension behind [`lora_linear`](super::lora_linear): the operation trait, its
//! flex kernel and its autodiff step.

#[cfg(feature = "flex")]
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
#[cfg(feature = "flex")]
use burn::backend::flex::{FlexQTensor, FlexTensor, Layout};
use burn::backend::ops::FloatTensorOps;
#[cfg(feature = "flex")]
use burn::backend::ops::QTensorOps;
#[cfg(feature = "flex")]
use burn::backend::quantization::global_scale_dtype;
use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{
    Autodiff, Backend, Dispatch, DispatchDevice, ExtensionType, TensorMetadata, backend_extension,
};
use burn::tensor::{DType, Shape, Tensor};

/// An operand that may be absent (the bias, the dropped input), carried across the dispatch
/// boundary.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "wgpu"))]
pub enum Optional<B: Backend> {
    /// The tensor.
    Present(FloatTensor<B>),
    /// No tensor.
    Absent,
}

impl<B: Backend> Optional<B> {
    pub(super) fn into_option(self) -> Option<FloatTensor<B>> {
        match self {
            Optional::Present(tensor) => Some(tensor),
            Optional::Absent => None,
        }
    }
}

impl<B: Backend> From<Option<FloatTensor<B>>> for Optional<B> {
    fn from(tensor: Option<FloatTensor<B>>) -> Self {
        match tensor {
            Some(tensor) => Optional::Present(tensor),
            None => Optional::Absent,
        }
    }
}

/// The fused operations. Every method has a body composed from Burn's operations; flex
/// overrides [`matmul_sum`](LoraOps::matmul_sum) with one `gemm` buffer, CubeCL (wgpu) with
/// Burn's matrix product and one in-place kernel for the rest, and autodiff overrides
/// [`lora_linear`](LoraOps::lora_linear) with its own backward step. Under Burn's kernel fusion
/// `matmul_sum` is one lazy operation and the others are composed from it.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu"),
    Fusion: cfg(feature = "wgpu"),
    Autodiff
)]
pub trait LoraOps: Backend {
    /// `p·q + alpha·r·t (+ bias)` in one output buffer.
    ///
    /// Shapes: `p: [m, k1]`, `q: [k1, n]`, `r: [m, k2]`, `t: [k2, n]`, `bias: [n]`, output
    /// `[m, n]`.
    #[fusion(dtype = p, shape = product_shape(p, q))]
    fn matmul_sum(
        p: FloatTensor<Self>,
        q: FloatTensor<Self>,
        r: FloatTensor<Self>,
        t: FloatTensor<Self>,
        #[extension_type] bias: Optional<Self>,
        alpha: f64,
    ) -> FloatTensor<Self> {
        matmul_sum_composed::<Self>(p, q, r, t, bias.into_option(), alpha)
    }

    /// `x·W + b + s·(x_d·A)·B` on 2-D operands, `x_d = x` when `dropped` is `None`.
    ///
    /// Shapes: `x, dropped: [m, d_in]`, `weight: [d_in, d_out]`, `bias: [d_out]`,
    /// `lora_a: [d_in, r]`, `lora_b: [r, d_out]`, output `[m, d_out]`.
    #[fusion(default)]
    fn lora_linear(
        input: FloatTensor<Self>,
        #[extension_type] dropped: Optional<Self>,
        weight: FloatTensor<Self>,
        #[extension_type] bias: Optional<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let source = dropped.into_option().unwrap_or_else(|| input.clone());
        let hidden = Self::float_matmul(source, lora_a);
        Self::matmul_sum(input, weight, hidden, lora_b, bias, scale)
    }

    /// [`matmul_sum`](LoraOps::matmul_sum) with a quantized `q` (`[k1, n]`), or its transpose
    /// when `transposed` (`q: [n, k1]`).
    #[fusion(default)]
    fn quantized_matmul_sum(
        p: FloatTensor<Self>,
        q: QuantizedTensor<Self>,
        transposed: bool,
        r: FloatTensor<Self>,
        t: FloatTensor<Self>,
        #[extension_type] bias: Optional<Self>,
        alpha: f64,
    ) -> FloatTensor<Self> {
        let q = Self::dequantize(q, p.dtype().into());
        let q = match transposed {
            true => Self::float_transpose(q),
            false => q,
        };
        Self::matmul_sum(p, q, r, t, bias, alpha)
    }

    /// [`lora_linear`](LoraOps::lora_linear) over a quantized weight (QLoRA).
    #[fusion(default)]
    fn quantized_lora_linear(
        input: FloatTensor<Self>,
        #[extension_type] dropped: Optional<Self>,
        weight: QuantizedTensor<Self>,
        #[extension_type] bias: Optional<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let source = dropped.into_option().unwrap_or_else(|| input.clone());
        let hidden = Self::float_matmul(source, lora_a);
        Self::quantized_matmul_sum(input, weight, false, hidden, lora_b, bias, scale)
    }
}

/// The shape of `p·q`, `[m, k]·[k, n]`.
#[cfg(feature = "wgpu")]
fn product_shape(p: &Shape, q: &Shape) -> Shape {
    Shape::new([p[0], q[1]])
}

/// [`LoraOps::matmul_sum`] from Burn's operations: the reference, and the path for dtypes the
/// flex kernel does not multiply.
pub(super) fn matmul_sum_composed<B: Backend>(
    p: FloatTensor<B>,
    q: FloatTensor<B>,
    r: FloatTensor<B>,
    t: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    alpha: f64,
) -> FloatTensor<B> {
    let low_rank = B::float_matmul(B::float_mul_scalar(r, alpha.into()), t);
    let sum = B::float_add(B::float_matmul(p, q), low_rank);
    match bias {
        Some(bias) => {
            let n = bias.shape()[0];
            B::float_add(sum, B::float_reshape(bias, Shape::new([1, n])))
        }
        None => sum,
    }
}

#[cfg(feature = "flex")]
impl LoraOps for Flex {
    fn matmul_sum(
        p: FlexTensor,
        q: FlexTensor,
        r: FlexTensor,
        t: FlexTensor,
        bias: Optional<Self>,
        alpha: f64,
    ) -> FlexTensor {
        let bias = bias.into_option();
        match p.dtype() {
            DType::F32 => kernel::matmul_sum::<f32>(&p, &q, &r, &t, bias.as_ref(), alpha as f32),
            DType::F64 => kernel::matmul_sum::<f64>(&p, &q, &r, &t, bias.as_ref(), alpha),
            _ => matmul_sum_composed::<Self>(p, q, r, t, bias, alpha),
        }
    }

    fn quantized_matmul_sum(
        p: FlexTensor,
        q: FlexQTensor,
        transposed: bool,
        r: FlexTensor,
        t: FlexTensor,
        bias: Optional<Self>,
        alpha: f64,
    ) -> FlexTensor {
        let bias = bias.into_option();
        let floats = [Some(&p), Some(&r), Some(&t), bias.as_ref()];
        let f32_operands = floats
            .iter()
            .flatten()
            .all(|tensor| tensor.dtype() == DType::F32);
        if f32_operands && let Some(weight) = kernel::QuantizedWeight::of(&q) {
            let alpha = alpha as f32;
            return kernel::quantized_matmul_sum(
                &p,
                &weight,
                transposed,
                &r,
                &t,
                bias.as_ref(),
                alpha,
            );
        }
        let q = Self::dequantize(q, p.dtype().into());
        let q = match transposed {
            true => Self::float_transpose(q),
            false => q,
        };
        matmul_sum_composed::<Self>(p, q, r, t, bias, alpha)
    }
}

/// The flex kernels: the thin product and the bias go into the output buffer first, then the
/// wide product accumulates into it inside `gemm`.
#[cfg(feature = "flex")]
mod kernel {
    use core::ops::Range;

    use super::*;

    /// The floats `gemm` multiplies natively.
    pub(super) trait Float: burn::tensor::Element + bytemuck::Pod {
        const ONE: Self;
    }

    impl Float for f32 {
        const ONE: Self = 1.0;
    }

    impl Float for f64 {
        const ONE: Self = 1.0;
    }

    /// A 2-D operand as `gemm` reads it: the address of element `[0, 0]`, its row and column
    /// strides. Any strides work, so transposed views cost no copy.
    struct Operand<T> {
        origin: *const T,
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    }

    fn operand<T: Float>(tensor: &FlexTensor) -> Operand<T> {
        let layout: &Layout = tensor.layout();
        let (rows, cols, row_stride, col_stride) = layout
            .as_2d_strides()
            .expect("the fused LoRA linear takes 2-D operands");
        let storage = tensor.storage::<T>();
        Operand {
            // In bounds: the layout's start offset addresses element [0, 0] of the storage.
            origin: storage[layout.start_offset()..].as_ptr(),
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// Products at least this large (`m·n·k`) run on rayon's threads, as flex's own matmul.
    const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

    fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
        match m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD {
            true => gemm::Parallelism::Rayon(0),
            false => gemm::Parallelism::None,
        }
    }

    /// `dst[m, n] (+)= beta·lhs·rhs` (`+=` when `accumulate`), `dst` row-major with row stride
    /// `dst_row_stride`.
    ///
    /// # Safety
    ///
    /// `dst` must address `m` rows of `n` writable elements at `dst_row_stride`, and each operand
    /// the rows and columns its strides give, all alive for the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product<T: Float>(
        dst: *mut T,
        dst_row_stride: usize,
        accumulate: bool,
        m: usize,
        n: usize,
        lhs: &Operand<T>,
        rhs: &Operand<T>,
        beta: T,
    ) {
        let k = lhs.cols;
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        // SAFETY: as the caller promises.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_row_stride as isize,
                accumulate,
                lhs.origin,
                lhs.col_stride,
                lhs.row_stride,
                rhs.origin,
                rhs.col_stride,
                rhs.row_stride,
                T::ONE,
                beta,
                false,
                false,
                false,
                parallelism(m, n, k),
            );
        }
    }

    /// A fresh `[m, n]` output holding `bias + alpha·r·t`, and whether it holds anything yet
    /// (it is zeros otherwise).
    fn prefill<T: Float>(
        m: usize,
        n: usize,
        r: &Operand<T>,
        t: &Operand<T>,
        bias: Option<&FlexTensor>,
        alpha: T,
    ) -> (FlexTensor, bool) {
        assert!(
            r.rows == m && t.cols == n && r.cols == t.rows,
            "the fused LoRA linear's low-rank operands do not fit [{m}, {n}]"
        );
        let mut output = FlexTensor::empty(Shape::new([m, n]), T::dtype());
        if m == 0 || n == 0 {
            return (output, false);
        }
        let out: &mut [T] = output.storage_mut();
        if let Some(bias) = bias {
            let values = bias.storage::<T>();
            let stride = bias.layout().strides()[0];
            let start = bias.layout().start_offset() as isize;
            for row in out.chunks_exact_mut(n) {
                for (j, value) in row.iter_mut().enumerate() {
                    *value = values[(start + j as isize * stride) as usize];
                }
            }
        }
        // SAFETY: `out` is the fresh contiguous [m, n] buffer above; `r` and `t` address live
        // tensors of the asserted shapes.
        unsafe { product(out.as_mut_ptr(), n, bias.is_some(), m, n, r, t, alpha) };
        let written = bias.is_some() || r.cols > 0;
        (output, written)
    }

    /// `p·q + alpha·r·t (+ bias)`: the thin product (`k = rank`) writes the buffer, then the
    /// wide one accumulates into it tile by tile.
    pub(super) fn matmul_sum<T: Float>(
        p: &FlexTensor,
        q: &FlexTensor,
        r: &FlexTensor,
        t: &FlexTensor,
        bias: Option<&FlexTensor>,
        alpha: T,
    ) -> FlexTensor {
        let (p, q, r, t) = (
            operand::<T>(p),
            operand::<T>(q),
            operand::<T>(r),
            operand::<T>(t),
        );
        assert!(
            p.cols == q.rows,
            "matmul_sum: p is [_, {}], q [{}, _]",
            p.cols,
            q.rows
        );
        let (m, n) = (p.rows, q.cols);
        let (mut output, written) = prefill(m, n, &r, &t, bias, alpha);
        if m > 0 && n > 0 {
            let out: &mut [T] = output.storage_mut();
            // SAFETY: `out` is the [m, n] output; `p` and `q` address live tensors whose shapes
            // agree with it (asserted above and in `prefill`).
            unsafe { product(out.as_mut_ptr(), n, written, m, n, &p, &q, T::ONE) };
        }
        output
    }

    /// A quantized weight `[rows, cols]` as the kernel reads it: one signed integer per byte
    /// and one f32 scale per block, `value = scale · q`, as flex dequantizes it.
    pub(super) struct QuantizedWeight<'a> {
        values: &'a [i8],
        scales: &'a [f32],
        rows: usize,
        cols: usize,
        /// The block's extent over rows and over columns (the whole tensor for one scale).
        block: [usize; 2],
        /// How many blocks span a row of blocks.
        blocks_per_row: usize,
    }

    impl<'a> QuantizedWeight<'a> {
        /// The weight, when the kernel reads its layout: contiguous 2-D values, one scale per
        /// tensor or per block dividing the shape, no second-level scale.
        pub(super) fn of(tensor: &'a FlexQTensor) -> Option<Self> {
            let DType::QFloat(scheme) = tensor.dtype() else {
                return None;
            };
            let values = tensor.tensor();
            let (rows, cols, _, _) = values.layout().as_2d_strides()?;
            let (start, end) = values.layout().contiguous_offsets()?;
            if values.dtype() != DType::I8 || global_scale_dtype(&scheme).is_some() {
                return None;
            }
            let block = match scheme.block_size() {
                Some(block) => block.as_dim::<2>().map(usize::from),
                None => [rows, cols],
            };
            if block.contains(&0) || rows % block[0] != 0 || cols % block[1] != 0 {
                return None;
            }
            let blocks_per_row = cols / block[1];
            let scales = tensor.scales();
            if scales.len() != (rows / block[0]) * blocks_per_row {
                return None;
            }
            Some(Self {
                values: &values.storage::<i8>()[start..end],
                scales,
                rows,
                cols,
                block,
                blocks_per_row,
            })
        }

        /// Writes `W[rows, cols]` dequantized into `panel`, row-major `[rows.len(), cols.len()]`.
        fn dequantize(&self, rows: Range<usize>, cols: Range<usize>, panel: &mut [f32]) {
            let width = cols.len();
            for (row, out) in rows.zip(panel.chunks_exact_mut(width)) {
                let scales = &self.scales[(row / self.block[0]) * self.blocks_per_row..];
                let values = &self.values[row * self.cols..(row + 1) * self.cols];
                let mut col = cols.start;
                while col < cols.end {
                    // One scale over the run to the end of this column block.
                    let run_end = ((col / self.block[1] + 1) * self.block[1]).min(cols.end);
                    let scale = scales[col / self.block[1]];
                    let run = &mut out[col - cols.start..run_end - cols.start];
                    for (value, &quantized) in run.iter_mut().zip(&values[col..run_end]) {
                        *value = scale * quantized as f32;
                    }
                    col = run_end;
                }
            }
        }
    }

    /// Floats in one dequantized panel: 1 MiB, so a panel stays in cache while `gemm` reads it.
    const PANEL_FLOATS: usize = 1 << 18;

    /// `p·W + alpha·r·t (+ bias)`, or `p·Wᵀ + …` when `transposed`, for a quantized `W`.
    ///
    /// The output is computed in blocks of columns. For each, the matching slice of `W`
    /// (columns of `W`, or rows when transposed) is dequantized into one reused panel and
    /// multiplied into the block: no float copy of the whole weight exists at any time.
    pub(super) fn quantized_matmul_sum(
        p: &FlexTensor,
        weight: &QuantizedWeight,
        transposed: bool,
        r: &FlexTensor,
        t: &FlexTensor,
        bias: Option<&FlexTensor>,
        alpha: f32,
    ) -> FlexTensor {
        let (p, r, t) = (operand::<f32>(p), operand::<f32>(r), operand::<f32>(t));
        let (k, n) = match transposed {
            false => (weight.rows, weight.cols),
            true => (weight.cols, weight.rows),
        };
        assert!(
            p.cols == k,
            "quantized matmul_sum: p is [_, {}], the weight [{k}, {n}]",
            p.cols
        );
        let m = p.rows;
        let (mut output, written) = prefill(m, n, &r, &t, bias, alpha);
        if m == 0 || n == 0 || k == 0 {
            return output;
        }
        let width = (PANEL_FLOATS / k).clamp(16, n.max(16)).min(n);
        let mut panel = vec![0.0f32; k * width];
        let out: &mut [f32] = output.storage_mut();
        for start in (0..n).step_by(width) {
            let columns = width.min(n - start);
            let panel = &mut panel[..k * columns];
            // The panel as the product's right operand, [k, columns].
            let rhs = match transposed {
                false => {
                    weight.dequantize(0..weight.rows, start..start + columns, panel);
                    Operand {
                        origin: panel.as_ptr(),
                        rows: k,
                        cols: columns,
                        row_stride: columns as isize,
                        col_stride: 1,
                    }
                }
                true => {
                    weight.dequantize(start..start + columns, 0..weight.cols, panel);
                    Operand {
                        origin: panel.as_ptr(),
                        rows: k,
                        cols: columns,
                        row_stride: 1,
                        col_stride: k as isize,
                    }
                }
            };
            // SAFETY: `out[.., start..start + columns]` lies in the [m, n] output (row stride
            // n); `p` is [m, k] and the panel [k, columns], alive for the call.
            unsafe {
                let dst = out.as_mut_ptr().add(start);
                product(dst, n, written, m, columns, &p, &rhs, 1.0);
            }
        }
        output
    }
}

/// The base weight a LoRA linear multiplies by, as the inner backend holds it.
#[derive(Debug, Clone)]
enum Base<B: Backend> {
    /// A float weight `[d_in, d_out]`.
    Dense(FloatTensor<B>),
    /// A quantized weight `[d_in, d_out]`, dequantized tile by tile where it is multiplied.
    Quantized(QuantizedTensor<B>),
}

impl<B: LoraOps> Base<B> {
    /// `p·W`, or `p·Wᵀ` when `transposed`: [`matmul_sum`](Self::matmul_sum) with a low-rank
    /// term of rank 0.
    fn matmul(&self, p: FloatTensor<B>, transposed: bool) -> FloatTensor<B> {
        let [m, n] = match (self, transposed) {
            (Base::Dense(weight), false) => [p.shape()[0], weight.shape()[1]],
            (Base::Dense(weight), true) => [p.shape()[0], weight.shape()[0]],
            (Base::Quantized(weight), false) => [p.shape()[0], weight.shape()[1]],
            (Base::Quantized(weight), true) => [p.shape()[0], weight.shape()[0]],
        };
        let (device, dtype) = (p.device(), p.dtype().into());
        let r = B::float_zeros(Shape::new([m, 0]), &device, dtype);
        let t = B::float_zeros(Shape::new([0, n]), &device, dtype);
        self.matmul_sum(p, transposed, r, t, Optional::Absent, 0.0)
    }

    /// `p·W + alpha·r·t + bias`, or `p·Wᵀ + …` when `transposed`.
    fn matmul_sum(
        &self,
        p: FloatTensor<B>,
        transposed: bool,
        r: FloatTensor<B>,
        t: FloatTensor<B>,
        bias: Optional<B>,
        alpha: f64,
    ) -> FloatTensor<B> {
        match self {
            Base::Dense(weight) => {
                let weight = match transposed {
                    true => B::float_transpose(weight.clone()),
                    false => weight.clone(),
                };
                B::matmul_sum(p, weight, r, t, bias, alpha)
            }
            Base::Quantized(weight) => {
                B::quantized_matmul_sum(p, weight.clone(), transposed, r, t, bias, alpha)
            }
        }
    }
}

/// The autodiff step of a LoRA linear. Its parents are `[x, x_d?, W?, A, B]`: `x_d` when
/// dropout gave the adapter its own input, `W` when the weight is a float tensor (a quantized
/// one never trains).
#[derive(Debug)]
struct LoraLinearBackward<const N: usize>;

/// What the backward step reads: only what some gradient needs. The parameters are alive
/// anyway; the input is kept only for `dA` (or `dW` when the weight trains), as Burn's own
/// matmul does, and `hidden` (`[m, r]`) only for `dB`. A quantized base stays quantized: no
/// float copy of it is kept.
#[derive(Debug, Clone)]
struct LoraLinearState<B: Backend> {
    /// The adapter reads `x` itself (no dropout): the parents are then `[x, W?, A, B]`.
    shared: bool,
    input: Option<FloatTensor<B>>,
    dropped: Option<FloatTensor<B>>,
    base: Base<B>,
    lora_a: FloatTensor<B>,
    lora_b: FloatTensor<B>,
    hidden: Option<FloatTensor<B>>,
    scale: f64,
}

impl<B: LoraOps, const N: usize> Backward<B, N> for LoraLinearBackward<N> {
    type State = LoraLinearState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let state = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let mut parents = ops.parents.into_iter();
        let shared = state.shared;
        let input_node = parents.next().flatten();
        let dropped_node = match shared {
            false => parents.next().flatten(),
            true => None,
        };
        let weight_node = match &state.base {
            Base::Dense(_) => parents.next().flatten(),
            Base::Quantized(_) => None,
        };
        let [a_node, b_node] = [(); 2].map(|_| parents.next().flatten());
        let source = match shared {
            true => state.input.clone(),
            false => state.dropped,
        };

        // g = s·dy·Bᵀ, [m, r]: the gradient reaching x_d·A.
        let needs_g =
            a_node.is_some() || dropped_node.is_some() || (shared && input_node.is_some());
        let scaled = needs_g.then(|| {
            let g = B::float_matmul(grad.clone(), B::float_transpose(state.lora_b.clone()));
            B::float_mul_scalar(g, state.scale.into())
        });
        if let (Some(node), Some(g), Some(source)) = (&a_node, &scaled, source) {
            let grad_a = B::float_matmul(B::float_transpose(source), g.clone());
            grads.register::<B>(node.id, grad_a);
        }
        if let (Some(node), Some(hidden)) = (&b_node, state.hidden) {
            let hidden = B::float_mul_scalar(B::float_transpose(hidden), state.scale.into());
            grads.register::<B>(node.id, B::float_matmul(hidden, grad.clone()));
        }
        if let (Some(node), Some(input)) = (&weight_node, state.input) {
            let grad_w = B::float_matmul(B::float_transpose(input), grad.clone());
            grads.register::<B>(node.id, grad_w);
        }
        let a_t = B::float_transpose(state.lora_a);
        match (shared, scaled) {
            // No dropout: dx = dy·Wᵀ + g·Aᵀ, one buffer.
            (true, Some(g)) => {
                if let Some(node) = &input_node {
                    let grad_x = state
                        .base
                        .matmul_sum(grad, true, g, a_t, Optional::Absent, 1.0);
                    grads.register::<B>(node.id, grad_x);
                }
            }
            (shared, g) => {
                if let Some(node) = &input_node {
                    grads.register::<B>(node.id, state.base.matmul(grad, true));
                }
                if let (false, Some(node), Some(g)) = (shared, &dropped_node, g) {
                    grads.register::<B>(node.id, B::float_matmul(g, a_t));
                }
            }
        }
    }
}

impl<B: LoraOps, C: CheckpointStrategy> LoraOps for Autodiff<B, C> {
    fn lora_linear(
        input: FloatTensor<Self>,
        dropped: Optional<Self>,
        weight: FloatTensor<Self>,
        bias: Optional<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let adapter = Adapter::<B, C> {
            lora_a,
            lora_b,
            scale,
        };
        let base = TrackedBase::Dense(weight);
        tracked_lora_linear(
            input,
            dropped.into_option(),
            base,
            bias.into_option(),
            adapter,
        )
    }

    fn quantized_lora_linear(
        input: FloatTensor<Self>,
        dropped: Optional<Self>,
        weight: QuantizedTensor<Self>,
        bias: Optional<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let adapter = Adapter::<B, C> {
            lora_a,
            lora_b,
            scale,
        };
        let base = TrackedBase::Quantized(weight);
        tracked_lora_linear(
            input,
            dropped.into_option(),
            base,
            bias.into_option(),
            adapter,
        )
    }
}

/// The base weight as the autodiff backend receives it: a float tensor, which may train, or a
/// quantized one, which never does.
enum TrackedBase<B: Backend, C: CheckpointStrategy> {
    Dense(FloatTensor<Autodiff<B, C>>),
    Quantized(QuantizedTensor<B>),
}

/// Both autodiff entry points: the bias, the parents, then [`record`].
fn tracked_lora_linear<B: LoraOps, C: CheckpointStrategy>(
    input: FloatTensor<Autodiff<B, C>>,
    dropped: Option<FloatTensor<Autodiff<B, C>>>,
    base: TrackedBase<B, C>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
    adapter: Adapter<B, C>,
) -> FloatTensor<Autodiff<B, C>> {
    // A bias that trains is added outside, where autodiff sums its gradient; a frozen one
    // (the usual case, PEFT's `bias = "none"`) goes into the fused buffer as a constant.
    if let Some(bias) = bias.as_ref().filter(|bias| bias.is_tracked()) {
        let output = tracked_lora_linear(input, dropped, base, None, adapter);
        let n = bias.shape()[0];
        let bias = Autodiff::<B, C>::float_reshape(bias.clone(), Shape::new([1, n]));
        return Autodiff::<B, C>::float_add(output, bias);
    }
    let bias = bias.map(|bias| bias.into_primitive());
    let mut nodes = vec![input.node()];
    nodes.extend(dropped.as_ref().map(|dropped| dropped.node()));
    let base = match base {
        TrackedBase::Dense(weight) => {
            nodes.push(weight.node());
            let tracked = weight.is_tracked();
            (Base::Dense(weight.into_primitive()), tracked)
        }
        TrackedBase::Quantized(weight) => (Base::Quantized(weight), false),
    };
    nodes.extend([adapter.lora_a.node(), adapter.lora_b.node()]);
    // Parents: x, x_d (with dropout), W (a float weight), A, B.
    match nodes.len() {
        3 => record::<B, C, 3>(parents(nodes), input, dropped, base, bias, adapter),
        4 => record::<B, C, 4>(parents(nodes), input, dropped, base, bias, adapter),
        _ => record::<B, C, 5>(parents(nodes), input, dropped, base, bias, adapter),
    }
}

/// The guards as the fixed-size array a backward step's preparation takes.
fn parents<const N: usize>(nodes: Vec<NodeGuard>) -> [NodeGuard; N] {
    match nodes.try_into() {
        Ok(parents) => parents,
        Err(_) => unreachable!("the parents are counted before the call"),
    }
}

/// An adapter's factors (tracked) and scale.
struct Adapter<B: Backend, C: CheckpointStrategy> {
    lora_a: FloatTensor<Autodiff<B, C>>,
    lora_b: FloatTensor<Autodiff<B, C>>,
    scale: f64,
}

/// Runs the forward pass on the inner backend and records the backward step when any operand
/// is tracked.
fn record<B: LoraOps, C: CheckpointStrategy, const N: usize>(
    nodes: [NodeGuard; N],
    input: FloatTensor<Autodiff<B, C>>,
    dropped: Option<FloatTensor<Autodiff<B, C>>>,
    (base, weight_tracked): (Base<B>, bool),
    bias: Option<FloatTensor<B>>,
    adapter: Adapter<B, C>,
) -> FloatTensor<Autodiff<B, C>> {
    let shared = dropped.is_none();
    let (a_tracked, b_tracked) = (adapter.lora_a.is_tracked(), adapter.lora_b.is_tracked());
    let input = input.into_primitive();
    let dropped = dropped.map(|dropped| dropped.into_primitive());
    let (lora_a, lora_b, scale) = (
        adapter.lora_a.into_primitive(),
        adapter.lora_b.into_primitive(),
        adapter.scale,
    );
    let source = dropped.clone().unwrap_or_else(|| input.clone());
    let hidden = B::float_matmul(source, lora_a.clone());
    let output = base.matmul_sum(
        input.clone(),
        false,
        hidden.clone(),
        lora_b.clone(),
        bias.into(),
        scale,
    );
    match LoraLinearBackward::<N>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = LoraLinearState {
                shared,
                input: (weight_tracked || (shared && a_tracked)).then_some(input),
                dropped: dropped.filter(|_| a_tracked),
                base,
                lora_a,
                lora_b,
                hidden: b_tracked.then_some(hidden),
                scale,
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// Whether `device` is a flex device, with or without autodiff.
#[cfg(feature = "flex")]
pub(super) fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether a fused kernel serves `dtype` on `device` (with or without autodiff): flex's in f32
/// and f64, the CubeCL one (wgpu) in f32, f16 and bf16.
pub(super) fn serves(device: &burn::tensor::Device, dtype: DType) -> bool {
    match device.clone().inner().as_dispatch() {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => matches!(dtype, DType::F32 | DType::F64),
        #[cfg(feature = "wgpu")]
        DispatchDevice::Cube(_) => matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
        _ => false,
    }
}

/// Whether [`lora_linear`] can run these operands: all on one device a fused kernel serves (with
/// or without autodiff), all of one dtype the kernel multiplies, except the weight, which may also be
/// quantized (QLoRA) over f32 operands.
pub(super) fn fusable<const D: usize>(
    input: &Tensor<D>,
    dropped: Option<&Tensor<D>>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    lora_a: &Tensor<2>,
    lora_b: &Tensor<2>,
) -> bool {
    let dtype = input.dtype();
    if !super::fuses(&input.device(), dtype) {
        return false;
    }
    let weight_fits = match weight.dtype() {
        DType::QFloat(_) => dtype == DType::F32,
        other => other == dtype,
    };
    let device = input.device().inner();
    let mut others = vec![(dtype, weight.device())];
    others.extend([lora_a, lora_b].map(|factor| (factor.dtype(), factor.device())));
    others.extend(dropped.map(|dropped| (dropped.dtype(), dropped.device())));
    others.extend(bias.map(|bias| (bias.dtype(), bias.device())));
    weight_fits
        && others
            .into_iter()
            .all(|(other_dtype, other)| other_dtype == dtype && other.inner() == device)
}

/// [`lora_linear`](super::lora_linear) through the extension: flattens the leading axes, runs
/// the fused operation and restores them.
pub(super) fn lora_linear<const D: usize>(
    input: Tensor<D>,
    dropped: Option<Tensor<D>>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    lora_a: Tensor<2>,
    lora_b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let mut dims = input.dims();
    let [d_input, d_output] = weight.dims();
    let flat = |tensor: Tensor<D>| tensor.reshape([-1, d_input as i64]).into_dispatch();
    let (input, dropped) = (flat(input), dropped.map(flat).into());
    let bias = bias.map(Tensor::into_dispatch).into();
    let (lora_a, lora_b) = (lora_a.into_dispatch(), lora_b.into_dispatch());
    let output = match weight.dtype() {
        DType::QFloat(_) => Dispatch::quantized_lora_linear(
            input,
            dropped,
            weight.into_dispatch(),
            bias,
            lora_a,
            lora_b,
            scale,
        ),
        _ => Dispatch::lora_linear(
            input,
            dropped,
            weight.into_dispatch(),
            bias,
            lora_a,
            lora_b,
            scale,
        ),
    };
    dims[D - 1] = d_output;
    Tensor::<2>::from_dispatch(output).reshape(dims)
}
