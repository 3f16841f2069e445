//! Post-training weight quantization (`edgec compile --quantize SCHEME`).
//!
//! Every MatMul whose B operand is a constant f32 K x N matrix becomes an `Op::MatMulNBits`
//! (onnxruntime's contrib op: the same format QAT exporters and onnxruntime's own quantizer
//! write), so the interpreter defines its meaning and the code generator has one quantized
//! matmul to lower. Large embedding tables read by Gather become int8 rows with one scale per row
//! (standard ops: Gather, Cast, Mul). The f32 originals are left for dead-code removal.

use super::{Pass, PassStats};
use crate::error::{Error, Result};
use crate::ir::nbits::{self, ActQuant, NBitsLayout};
use crate::ir::{DType, Dim, Graph, Op, Tensor, TensorType, Value, ValueRef};

/// How weights are rounded: bits, block size along K, symmetric or with zero points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scheme {
    pub bits: usize,
    /// Values per block along K; `None` is one block per output channel (the whole column).
    pub group: Option<usize>,
    pub asym: bool,
    /// Activations rounded to int8 per row and block at run time (integer dot products).
    pub a8: bool,
}

impl std::str::FromStr for Scheme {
    type Err = String;
    /// `int8` (per channel), `int4` (group 32), `int4:g128`, `int4:g32:asym`, `int8:g64`, ...;
    /// `:a8` (or `w8a8`, `w4a8`) adds int8 activations.
    fn from_str(s: &str) -> std::result::Result<Scheme, String> {
        let mut parts = s.split(':');
        let (bits, default_group, a8) = match parts.next() {
            Some("int8") => (8, None, false),
            Some("int4") => (4, Some(32), false),
            Some("w8a8") => (8, None, true),
            Some("w4a8") => (4, Some(32), true),
            _ => {
                return Err(format!(
                    "unknown quantization scheme '{s}' (int8, int4, int4:g128, int4:g32:asym, w8a8, w4a8)"
                ))
            }
        };
        let mut scheme = Scheme { bits, group: default_group, asym: false, a8 };
        for p in parts {
            if p == "a8" {
                scheme.a8 = true;
            } else if p == "asym" {
                scheme.asym = true;
            } else if p == "sym" {
                scheme.asym = false;
            } else if p == "channel" {
                scheme.group = None;
            } else if let Some(g) = p.strip_prefix('g').and_then(|g| g.parse::<usize>().ok()) {
                if g < 2 || g % 2 != 0 {
                    return Err(format!("group size {g} must be even and at least 2"));
                }
                scheme.group = Some(g);
            } else {
                return Err(format!("unknown quantization option '{p}' in '{s}' (gN, sym, asym, channel)"));
            }
        }
        Ok(scheme)
    }
}

impl Scheme {
    /// Bytes a K x N weight takes in this scheme as MatMulNBits constants (values, f32 scales,
    /// zero points).
    pub fn weight_bytes(&self, k: usize, n: usize) -> Result<usize> {
        let l = NBitsLayout::new(k, n, self.bits, self.group.unwrap_or(k)).map_err(Error::Invalid)?;
        Ok(l.b_len() + 4 * n * l.blocks() + if self.asym { n * l.zp_cols() } else { 0 })
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "int{}", self.bits)?;
        match self.group {
            Some(g) => write!(f, ":g{g}")?,
            None => write!(f, ":channel")?,
        }
        if self.asym {
            write!(f, ":asym")?;
        }
        if self.a8 {
            write!(f, ":a8")?;
        }
        Ok(())
    }
}

/// `--act-static`: a layer's static activation scale from its calibration statistics (one scale
/// per tensor; the input of layers that share it, q/k/v or gate/up, gets one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActStatic {
    /// The calibration range: int8 with max |x| / 127, or (`asym`) uint8 spanning min..max with a
    /// zero point.
    MinMax { asym: bool },
    /// int8 with the P-th percentile of |x| over the tensor / 127 (values beyond it saturate).
    Percentile(f64),
}

impl std::str::FromStr for ActStatic {
    type Err = String;
    /// `minmax`, `minmax:asym`, `percentile` (99.99) or `percentile:P`.
    fn from_str(s: &str) -> std::result::Result<ActStatic, String> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(ActStatic::MinMax { asym: false }),
            Some(("minmax", "asym")) => Ok(ActStatic::MinMax { asym: true }),
            None if s == "percentile" => Ok(ActStatic::Percentile(99.99)),
            Some(("percentile", p)) => match p.parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(ActStatic::Percentile(p)),
                _ => Err(format!("'{s}': the percentile must be a number in (0, 100], e.g. percentile:99.9")),
            },
            _ => Err(format!("unknown static activation method '{s}' (minmax, minmax:asym, percentile, percentile:P)")),
        }
    }
}

impl ActStatic {
    /// The percentile calibration has to record.
    pub fn percentile(&self) -> Option<f64> {
        match self {
            ActStatic::Percentile(p) => Some(*p),
            ActStatic::MinMax { .. } => None,
        }
    }

    /// The activation quantization of a layer whose input has statistics `s` (`None` when its
    /// range is empty: the layer keeps rounding per row at run time).
    pub fn params(&self, s: &crate::calib::ChannelStats) -> Option<ActQuant> {
        let lo = s.min.iter().copied().fold(0f32, f32::min);
        let hi = s.max.iter().copied().fold(0f32, f32::max);
        match self {
            ActStatic::MinMax { asym: false } => ActQuant::new(hi.max(-lo) / 127.0, 0, DType::I8).ok(),
            ActStatic::MinMax { asym: true } => {
                let scale = (hi - lo) / 255.0;
                let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
                ActQuant::new(scale, zero, DType::U8).ok()
            }
            ActStatic::Percentile(_) => ActQuant::new(s.tensor_abs_percentile / 127.0, 0, DType::I8).ok(),
        }
    }
}

/// The static activation quantization of every linear layer of `g` that ran in the calibration,
/// by node name (for `Quantize::act_static`).
pub fn static_scales(
    g: &Graph,
    cal: &crate::calib::Calibration,
    method: ActStatic,
) -> std::collections::HashMap<String, ActQuant> {
    crate::calib::linear_layers(g)
        .into_iter()
        .filter_map(|l| Some((g.node(l.node).name.clone(), method.params(cal.stats_for(g, l.node)?)?)))
        .collect()
}

/// Scale and zero point of one block, and the rounding of a value with them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockParams {
    pub scale: f32,
    /// Unsigned zero point: stored = round(w / scale) + zero.
    pub zero: u8,
    pub max_q: u8,
}

impl BlockParams {
    /// Round-to-nearest parameters for `values`. Symmetric int4 maps the largest-magnitude value to
    /// -8 (all 16 levels used, as llama.cpp's Q4_0 does); symmetric int8 uses -127..=127;
    /// asymmetric spans min..max with an integer zero point.
    pub fn fit(values: &[f32], bits: usize, asym: bool) -> BlockParams {
        let max_q = ((1u32 << bits) - 1) as u8;
        let half = 1u8 << (bits - 1);
        if asym {
            let lo = values.iter().copied().fold(0f32, f32::min);
            let hi = values.iter().copied().fold(0f32, f32::max);
            let scale = if hi > lo { (hi - lo) / max_q as f32 } else { 1.0 };
            let zero = (-lo / scale).round().clamp(0.0, max_q as f32) as u8;
            return BlockParams { scale, zero, max_q };
        }
        let peak = values.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let scale = if peak == 0.0 {
            1.0
        } else if bits == 4 {
            peak / -(half as f32)
        } else {
            peak.abs() / (half as f32 - 1.0)
        };
        BlockParams { scale, zero: half, max_q }
    }

    /// `fit`, then the best of a grid of narrower ranges (clipping the largest values) by squared
    /// rounding error over the block, each value's error times its `importance` when given (the
    /// mean square of the activation it multiplies): outliers cost less than the resolution they
    /// take away.
    pub fn fit_search(values: &[f32], importance: Option<&[f32]>, bits: usize, asym: bool) -> BlockParams {
        let base = BlockParams::fit(values, bits, asym);
        let err = |p: &BlockParams| -> f64 {
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let e = ((p.dequantize(p.quantize(v)) - v) as f64).powi(2);
                    importance.map_or(e, |imp| e * imp[i] as f64)
                })
                .sum()
        };
        let (mut best, mut best_err) = (base, err(&base));
        if base.scale == 1.0 && values.iter().all(|&v| v == 0.0) {
            return base;
        }
        for step in 1..=CLIP_STEPS {
            let f = 1.0 - step as f32 * CLIP_STEP;
            let scaled: Vec<f32> = values.iter().map(|v| v * f).collect();
            // The parameters of the shrunken block, applied to the real values (which then clip).
            let p = BlockParams::fit(&scaled, bits, asym);
            let e = err(&p);
            if e < best_err {
                (best, best_err) = (p, e);
            }
        }
        best
    }

    pub fn quantize(&self, w: f32) -> u8 {
        ((w / self.scale).round() + self.zero as f32).clamp(0.0, self.max_q as f32) as u8
    }

    pub fn dequantize(&self, q: u8) -> f32 {
        (q as i32 - self.zero as i32) as f32 * self.scale
    }
}

/// The clipping grid of `fit_search`: ranges 97 %, 94 %, ... 55 % of the block's.
const CLIP_STEPS: usize = 15;
const CLIP_STEP: f32 = 0.03;

/// A K x N weight in MatMulNBits form.
pub struct Quantized {
    pub layout: NBitsLayout,
    pub b: Vec<u8>,
    pub scales: Vec<f32>,
    /// Packed zero points (asymmetric schemes only).
    pub zero_points: Option<Vec<u8>>,
}

impl Quantized {
    /// An all-zero weight of `layout` (symmetric: default zero points; else zero points 0).
    pub fn new(k: usize, n: usize, scheme: Scheme) -> Result<Quantized> {
        let layout = NBitsLayout::new(k, n, scheme.bits, scheme.group.unwrap_or(k)).map_err(Error::Invalid)?;
        Ok(Quantized {
            layout,
            b: vec![0; layout.b_len()],
            scales: vec![0.0; n * layout.blocks()],
            zero_points: scheme.asym.then(|| vec![0; n * layout.zp_cols()]),
        })
    }

    /// Stores block `blk` of column `col` (`q` holds its values along K).
    pub fn set_block(&mut self, col: usize, blk: usize, p: BlockParams, q: &[u8]) {
        let l = self.layout;
        self.scales[col * l.blocks() + blk] = p.scale;
        if let Some(z) = &mut self.zero_points {
            nbits::set(z, col * l.zp_cols(), blk, l.bits, p.zero);
        }
        let base = (col * l.blocks() + blk) * l.blob();
        for (j, &v) in q.iter().enumerate() {
            nbits::set(&mut self.b, base, j, l.bits, v);
        }
    }
}

impl Quantized {
    /// The weight the quantized one stands for, row-major K x N.
    pub fn dequantize(&self) -> Vec<f32> {
        let l = self.layout;
        let mut w = vec![0f32; l.k * l.n];
        for c in 0..l.n {
            for kk in 0..l.k {
                let blk = kk / l.block_size;
                let z = l.zero(self.zero_points.as_deref(), blk, c) as i32;
                w[kk * l.n + c] = (l.q(&self.b, kk, c) as i32 - z) as f32 * self.scales[c * l.blocks() + blk];
            }
        }
        w
    }
}

/// How a block's range is chosen before rounding to nearest.
#[derive(Clone, Copy, Debug)]
pub enum Range<'a> {
    /// The block's full range (`--method absmax`).
    Full,
    /// The clipped range with the least squared weight error (`--method mse`).
    Search,
    /// The clipped range with the least squared error weighted by each input row's activation
    /// energy `E[x_k²]` (K values): the layer's output error, as far as its diagonal goes (AWQ's
    /// clipping search; with `--smooth awq`).
    Weighted(&'a [f32]),
}

/// Round-to-nearest quantization of a row-major K x N matrix, column by column and block by block,
/// with each block's range chosen by `range`.
pub fn quantize_rtn(w: &[f32], k: usize, n: usize, scheme: Scheme, range: Range) -> Result<Quantized> {
    let mut out = Quantized::new(k, n, scheme)?;
    let bs = out.layout.block_size;
    if let Range::Weighted(imp) = range {
        if imp.len() != k {
            return Err(Error::invalid(format!("{} activation energies for a weight with K = {k}", imp.len())));
        }
    }
    // Each column's blocks are independent: fit them on every core, store them in order.
    let fit_column = |c: usize| -> Vec<(BlockParams, Vec<u8>)> {
        let col: Vec<f32> = (0..k).map(|kk| w[kk * n + c]).collect();
        col.chunks(bs)
            .enumerate()
            .map(|(b, chunk)| {
                let p = match range {
                    Range::Full => BlockParams::fit(chunk, scheme.bits, scheme.asym),
                    Range::Search => BlockParams::fit_search(chunk, None, scheme.bits, scheme.asym),
                    Range::Weighted(imp) => BlockParams::fit_search(
                        chunk,
                        Some(&imp[b * bs..b * bs + chunk.len()]),
                        scheme.bits,
                        scheme.asym,
                    ),
                };
                (p, chunk.iter().map(|&v| p.quantize(v)).collect())
            })
            .collect()
    };
    out.fill_columns(fit_column);
    Ok(out)
}

impl Quantized {
    /// Stores every column's blocks, computed by `column(c)` for the N columns on every core.
    pub fn fill_columns(&mut self, column: impl Fn(usize) -> Vec<(BlockParams, Vec<u8>)> + Sync) {
        let n = self.layout.n;
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
        let per = n.div_ceil(threads);
        let column = &column;
        let columns: Vec<Vec<(BlockParams, Vec<u8>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| s.spawn(move || (t * per..((t + 1) * per).min(n)).map(column).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("quantization worker")).collect()
        });
        for (c, blocks) in columns.into_iter().enumerate() {
            for (blk, (p, q)) in blocks.into_iter().enumerate() {
                self.set_block(c, blk, p, &q);
            }
        }
    }
}

/// Shell-style pattern: `*` matches any run of characters; without `*` it matches substrings.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Gather tables smaller than this stay f32 (position tables, small lookups).
const MIN_EMBEDDING_ROWS: usize = 1024;

/// A per-layer precision rule (`--keep PATTERN=PRECISION`, `--keep-fp32 PATTERN`, `--auto-keep`):
/// matching weights get `precision` instead of the pass's main scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// A node or weight name: substring or `*` pattern (`pattern_matches`), or, when `exact`, the
    /// whole name (the sensitivity scan names layers exactly).
    pub pattern: String,
    pub exact: bool,
    /// `None` leaves the weight in f32.
    pub precision: Option<Scheme>,
}

impl Rule {
    fn matches(&self, name: &str) -> bool {
        if self.exact {
            self.pattern == name
        } else {
            pattern_matches(&self.pattern, name)
        }
    }
}

impl std::str::FromStr for Rule {
    type Err = String;
    /// `PATTERN=fp32` or `PATTERN=SCHEME` (`lm_head=int8`, `layers.0.*=int4:g64`).
    fn from_str(s: &str) -> std::result::Result<Rule, String> {
        let (pattern, prec) =
            s.rsplit_once('=').ok_or_else(|| format!("'{s}' must be PATTERN=PRECISION (fp32, int8, int4:g64, ...)"))?;
        if pattern.is_empty() {
            return Err(format!("'{s}': empty pattern"));
        }
        let precision = parse_precision(prec).map_err(|e| format!("'{s}': {e}"))?;
        Ok(Rule { pattern: pattern.to_string(), exact: false, precision })
    }
}

/// `fp32` (`None`) or a scheme.
pub fn parse_precision(s: &str) -> std::result::Result<Option<Scheme>, String> {
    match s {
        "fp32" | "f32" => Ok(None),
        scheme => scheme.parse().map(Some),
    }
}

pub struct Quantize {
    pub scheme: Scheme,
    /// Search each block's clipping range for the least rounding error (`--method mse`) instead of
    /// taking its full range (`--method absmax`, the default: on SmolLM2 int4 g32 the search gave
    /// perplexity 44.1 against 42.2, clipped outlier weights matter more than resolution).
    pub search: bool,
    /// Activation energy `E[x_k²]` of each layer's input rows, by MatMul node name (`--smooth awq`,
    /// from calibration): those layers search their block ranges weighted by it (`Range::Weighted`).
    pub importance: std::collections::HashMap<String, Vec<f32>>,
    /// Per-layer exceptions to `scheme`; the first rule matching the node or weight name wins.
    pub rules: Vec<Rule>,
    /// Rounds a weight instead of round-to-nearest (GPTQ); gets the MatMul's node name and the
    /// layer's scheme.
    #[allow(clippy::type_complexity)]
    pub rounder: Option<Box<dyn Fn(&str, &[f32], usize, usize, Scheme) -> Result<Option<Quantized>> + Send + Sync>>,
    /// Static activation scales (`--act-static`, from calibration) by MatMul node name: layers whose
    /// scheme has int8 activations (`:a8`) use them instead of rounding per row at run time.
    pub act_static: std::collections::HashMap<String, ActQuant>,
}

impl Quantize {
    /// `keep`: node or weight name patterns left in f32.
    pub fn new(scheme: Scheme, keep: Vec<String>) -> Quantize {
        let rules = keep.into_iter().map(|pattern| Rule { pattern, exact: false, precision: None }).collect();
        Quantize {
            scheme,
            rules,
            search: false,
            importance: Default::default(),
            rounder: None,
            act_static: Default::default(),
        }
    }

    /// The weight `w` (K x N) of MatMul `name` rounded to `scheme`: by the rounder (GPTQ) when it
    /// has one for the layer, else round-to-nearest.
    pub fn round(&self, name: &str, w: &[f32], k: usize, n: usize, scheme: Scheme) -> Result<Quantized> {
        if let Some(q) = self.rounder.as_ref().map(|r| r(name, w, k, n, scheme)).transpose()?.flatten() {
            return Ok(q);
        }
        quantize_rtn(w, k, n, scheme, self.range(name))
    }

    /// Searches every calibrated layer's block ranges weighted by its input rows' activation
    /// energy `E[x_k²]` from `cal` (AWQ's clipping search).
    pub fn weigh_ranges_by(&mut self, g: &Graph, cal: &crate::calib::Calibration) {
        for l in crate::calib::linear_layers(g) {
            if let Some(h) = cal.gram_for(g, l.node) {
                let energy = h.channel_mean_sq().into_iter().map(|e| e as f32).collect();
                self.importance.insert(g.node(l.node).name.clone(), energy);
            }
        }
    }

    /// The scheme `run` gives linear layer `l` (`None`: it stays f32, as a Gemm or by a rule).
    pub fn layer_scheme(&self, g: &Graph, l: &crate::calib::Linear) -> Option<Scheme> {
        let node = g.node(l.node);
        let c = g.const_of(l.weight)?;
        if node.op != Op::MatMul {
            return None;
        }
        self.precision(&[&node.name, &c.name])
    }

    /// How layer `name`'s block ranges are chosen.
    pub fn range(&self, name: &str) -> Range<'_> {
        match self.importance.get(name) {
            Some(imp) => Range::Weighted(imp),
            None if self.search => Range::Search,
            None => Range::Full,
        }
    }

    /// The precision of a layer or table with these names (`None`: f32).
    pub fn precision(&self, names: &[&str]) -> Option<Scheme> {
        match self.rules.iter().find(|r| names.iter().any(|n| r.matches(n))) {
            Some(r) => r.precision,
            None => Some(self.scheme),
        }
    }
}

/// The f32 contents of a constant value.
fn const_f32(g: &Graph, v: ValueRef) -> Option<(Vec<usize>, Vec<f32>, String)> {
    let c = g.const_of(v)?;
    if c.dtype != DType::F32 {
        return None;
    }
    let vals = c.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    Some((c.shape.clone(), vals, c.name.clone()))
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let mut changed = 0;
        let nodes: Vec<_> = g.g.node_indices().collect();
        for n in nodes {
            let node = g.node(n).clone();
            let ins = g.inputs_of(n);
            match node.op {
                Op::MatMul => {
                    let (Some(a), Some(b)) = (ins[0], ins[1]) else { continue };
                    let Some((shape, w, wname)) = const_f32(g, b) else { continue };
                    if shape.len() != 2 || g.ty(a).dtype != DType::F32 {
                        continue;
                    }
                    let Some(scheme) = self.precision(&[&node.name, &wname]) else { continue };
                    let (k, nn) = (shape[0], shape[1]);
                    let q = self.round(&node.name, &w, k, nn, scheme)?;
                    let l = q.layout;
                    let bq = g.add_const(
                        format!("{wname}.q{}", l.bits),
                        &Tensor::from_vec(vec![nn, l.blocks(), l.blob()], q.b),
                    );
                    let sc = g.add_const(format!("{wname}.scales"), &Tensor::from_vec(vec![nn * l.blocks()], q.scales));
                    let zp = q.zero_points.map(|z| {
                        g.add_const(format!("{wname}.zero_points"), &Tensor::from_vec(vec![nn * l.zp_cols()], z))
                    });
                    let accuracy_level = if scheme.a8 { 4 } else { 0 };
                    let act = if scheme.a8 { self.act_static.get(&node.name).copied() } else { None };
                    let op = Op::MatMulNBits { k, n: nn, bits: l.bits, block_size: l.block_size, accuracy_level, act };
                    let out = node.outputs[0].clone();
                    let m = g.add_node(op, node.name.clone(), &[Some(a), Some(bq), Some(sc), zp], vec![out]);
                    g.replace_uses(ValueRef { node: n, slot: 0 }, ValueRef { node: m, slot: 0 });
                    changed += 1;
                }
                Op::Gather { axis: 0 } => {
                    let (Some(t), Some(ids)) = (ins[0], ins[1]) else { continue };
                    let Some((shape, w, wname)) = const_f32(g, t) else { continue };
                    // Tables are int8 rows whatever the scheme (a rule can only keep them f32).
                    if shape.len() != 2
                        || shape[0] < MIN_EMBEDDING_ROWS
                        || self.precision(&[&node.name, &wname]).is_none()
                    {
                        continue;
                    }
                    quantize_embedding(g, n, &node.name, &node.outputs[0], ids, &wname, &shape, &w);
                    changed += 1;
                }
                _ => {}
            }
        }
        Ok(PassStats { changed })
    }
}

/// Gather(table, ids) -> Mul(Cast(Gather(int8 table, ids)), Gather(row scales, ids)).
#[allow(clippy::too_many_arguments)]
fn quantize_embedding(
    g: &mut Graph,
    n: petgraph::stable_graph::NodeIndex,
    name: &str,
    out: &Value,
    ids: ValueRef,
    wname: &str,
    shape: &[usize],
    w: &[f32],
) {
    let (rows, d) = (shape[0], shape[1]);
    let mut q = vec![0i8; rows * d];
    let mut scales = vec![0f32; rows];
    for r in 0..rows {
        let p = BlockParams::fit(&w[r * d..(r + 1) * d], 8, false);
        scales[r] = p.scale;
        for c in 0..d {
            q[r * d + c] = (p.quantize(w[r * d + c]) as i32 - p.zero as i32) as i8;
        }
    }
    let qt = g.add_const(format!("{wname}.q8"), &Tensor::from_vec(vec![rows, d], q));
    let st = g.add_const(format!("{wname}.row_scales"), &Tensor::from_vec(vec![rows, 1], scales));
    let out_dims = out.ty.shape.clone();
    let with_dtype = |dtype: DType, last: Option<Dim>| {
        let shape = out_dims.clone().map(|mut s| {
            if let (Some(l), Some(x)) = (last.clone(), s.last_mut()) {
                *x = l;
            }
            s
        });
        TensorType { dtype, shape }
    };
    let value = |suffix: &str, ty: TensorType| Value { name: format!("{}{suffix}", out.name), ty };
    let gq = g.add_node(
        Op::Gather { axis: 0 },
        format!("{name}.q8"),
        &[Some(qt), Some(ids)],
        vec![value(".q8", with_dtype(DType::I8, None))],
    );
    let cast = g.add_node(
        Op::Cast { to: DType::F32 },
        format!("{name}.dequant"),
        &[Some(ValueRef { node: gq, slot: 0 })],
        vec![value(".deq", with_dtype(DType::F32, None))],
    );
    let gs = g.add_node(
        Op::Gather { axis: 0 },
        format!("{name}.scales"),
        &[Some(st), Some(ids)],
        vec![value(".scale", with_dtype(DType::F32, Some(Dim::fixed(1))))],
    );
    let mul = g.add_node(
        Op::Binary(crate::ir::BinaryOp::Mul),
        name.to_string(),
        &[Some(ValueRef { node: cast, slot: 0 }), Some(ValueRef { node: gs, slot: 0 })],
        vec![out.clone()],
    );
    g.replace_uses(ValueRef { node: n, slot: 0 }, ValueRef { node: mul, slot: 0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse() {
        assert_eq!("int8".parse::<Scheme>().unwrap(), Scheme { bits: 8, group: None, asym: false, a8: false });
        assert_eq!("int4".parse::<Scheme>().unwrap(), Scheme { bits: 4, group: Some(32), asym: false, a8: false });
        assert_eq!(
            "int4:g128:asym".parse::<Scheme>().unwrap(),
            Scheme { bits: 4, group: Some(128), asym: true, a8: false }
        );
        assert_eq!("w4a8".parse::<Scheme>().unwrap(), Scheme { bits: 4, group: Some(32), asym: false, a8: true });
        assert!("int3".parse::<Scheme>().is_err());
        assert_eq!("minmax".parse::<ActStatic>().unwrap(), ActStatic::MinMax { asym: false });
        assert_eq!("minmax:asym".parse::<ActStatic>().unwrap(), ActStatic::MinMax { asym: true });
        assert_eq!("percentile".parse::<ActStatic>().unwrap(), ActStatic::Percentile(99.99));
        assert_eq!("percentile:99.9".parse::<ActStatic>().unwrap(), ActStatic::Percentile(99.9));
        for bad in ["percentile:0", "percentile:101", "percentile:x", "percentile:NaN", "max", "minmax:sym"] {
            assert!(bad.parse::<ActStatic>().is_err(), "{bad}");
        }
        assert!("int4:g7".parse::<Scheme>().is_err());
    }

    #[test]
    fn rounding_error_is_within_half_a_step() {
        let k = 70; // not a multiple of the group: the last block is partial
        let n = 3;
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for scheme in ["int8", "int4", "int4:g16:asym", "int8:g32:asym"] {
            let s: Scheme = scheme.parse().unwrap();
            let q = quantize_rtn(&w, k, n, s, Range::Full).unwrap();
            let l = q.layout;
            for c in 0..n {
                for kk in 0..k {
                    let blk = kk / l.block_size;
                    let scale = q.scales[c * l.blocks() + blk];
                    let z = l.zero(q.zero_points.as_deref(), blk, c) as i32;
                    let back = (l.q(&q.b, kk, c) as i32 - z) as f32 * scale;
                    let err = (back - w[kk * n + c]).abs();
                    // Symmetric int4 maps the peak to -8, so the opposite extreme clamps at +7.
                    let bound = if s.bits == 4 && !s.asym { 1.0 } else { 0.5 };
                    assert!(err <= scale.abs() * bound * (1.0 + 1e-5), "{scheme}: {err} vs step {scale}");
                }
            }
        }
    }

    /// The range searches: each never does worse than the full range by its own measure, and
    /// weighting by activation energy trades the quiet rows' error for the loud rows'.
    #[test]
    fn range_searches_lower_their_own_error() {
        let w: Vec<f32> = (0..32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let mut loud = vec![1f32; 32];
        for i in [1, 6, 11, 20] {
            loud[i] = 400.0;
        }
        let err = |p: &BlockParams, imp: &[f32]| -> f64 {
            w.iter().zip(imp).map(|(&v, &e)| ((p.dequantize(p.quantize(v)) - v) as f64).powi(2) * e as f64).sum()
        };
        let ones = vec![1f32; 32];
        let full = BlockParams::fit(&w, 4, false);
        let plain = BlockParams::fit_search(&w, None, 4, false);
        let weighted = BlockParams::fit_search(&w, Some(&loud), 4, false);
        assert!(err(&plain, &ones) <= err(&full, &ones));
        assert!(err(&weighted, &loud) <= err(&full, &loud));
        assert!(err(&weighted, &loud) <= err(&plain, &loud));
        // Through quantize_rtn: a wrong number of energies is an error, not a panic.
        assert!(quantize_rtn(&w, 32, 1, "int4".parse().unwrap(), Range::Weighted(&loud[..8])).is_err());
        let q = quantize_rtn(&w, 32, 1, "int4".parse().unwrap(), Range::Weighted(&loud)).unwrap();
        assert_eq!(q.scales[0], weighted.scale);
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("lm_head", "/lm_head/MatMul"));
        assert!(pattern_matches("/model/layers.0/*", "/model/layers.0/mlp/up_proj/MatMul"));
        assert!(!pattern_matches("/model/layers.1/*", "/model/layers.10/mlp"));
    }
}
