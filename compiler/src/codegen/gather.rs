//! Gather, GatherElements and GatherND as one kernel: a loop nest over the output in which the
//! data offset is affine in the loop indices plus `index_t * stride_t` for index components read
//! from the indices tensor. Negative indices count from the end; indices are clamped into range so
//! a bad index can never read outside the tensor.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};

use super::emit::Kb;
use super::map::{cast, load_elem, store_elem, View};
use crate::ir::Dim;

#[derive(Clone, Debug)]
pub struct GatherKernel {
    pub dims: Vec<Dim>,
    pub out: View,
    pub data: View,
    pub indices: View,
    /// Per index component: offset (in elements) inside the indices view, the data stride it
    /// scales, and the data dimension it indexes.
    pub components: Vec<(Dim, Dim, Dim)>,
}

pub fn emit_gather(kb: &mut Kb, g: &GatherKernel) {
    let dims: Vec<Value> = g.dims.iter().map(|d| kb.dim(d)).collect();
    let views = [&g.out, &g.data, &g.indices];
    let strides: Vec<Vec<Value>> = views.iter().map(|v| v.strides.iter().map(|d| kb.dim(d)).collect()).collect();
    let offs: Vec<Value> = views.iter().map(|v| kb.dim(&v.offset)).collect();
    let bases: Vec<Value> = views.iter().map(|v| kb.base(v.loc)).collect();
    let comps: Vec<(Value, Value, Value)> =
        g.components.iter().map(|(o, s, d)| (kb.dim(o), kb.dim(s), kb.dim(d))).collect();
    kb.loop_nest(&dims, &strides, offs, &mut Vec::new(), &mut |kb, offs, _| {
        let mut data_off = offs[1];
        for &(io, ds, dd) in &comps {
            let at = kb.fb.ins().iadd(offs[2], io);
            let addr = kb.elem_addr(bases[2], at, g.indices.dtype.size());
            let i = load_elem(kb, g.indices.dtype, addr, 0);
            let i = cast(kb, i, g.indices.dtype, crate::ir::DType::I64);
            let neg = kb.fb.ins().icmp_imm_s(IntCC::SignedLessThan, i, 0);
            let wrapped = kb.fb.ins().iadd(i, dd);
            let i = kb.fb.ins().select(neg, wrapped, i);
            let zero = kb.iconst(0);
            let i = kb.fb.ins().smax(i, zero);
            let hi = kb.fb.ins().iadd_imm_s(dd, -1);
            let i = kb.fb.ins().smin(i, hi);
            let d = kb.fb.ins().imul(i, ds);
            data_off = kb.fb.ins().iadd(data_off, d);
        }
        let src = kb.elem_addr(bases[1], data_off, g.data.dtype.size());
        let v = load_elem(kb, g.data.dtype, src, 0);
        let dst = kb.elem_addr(bases[0], offs[0], g.out.dtype.size());
        store_elem(kb, g.out.dtype, v, dst, 0);
    });
}
