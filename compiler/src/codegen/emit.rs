//! The kernel builder: a Cranelift `FunctionBuilder` plus what every kernel needs: runtime dims
//! from the call's symbol table, buffer base pointers, typed loads and stores, and counted loops.
//!
//! The entry point is `void entry(const EdgecCall *call)`; the layout of `EdgecCall` is fixed by
//! docs/artifact-format.md. Every other function is shared by all the nodes whose kernels are alike
//! but for where their tensors live: it takes a parameter block, `[call, base 0, base 1, ...]`,
//! and reads its buffers as `Loc::Param(i)` (a task also takes its `begin`, `end`).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

use super::target::Target;
use crate::ir::{DType, Dim};

/// Byte offsets of the `EdgecCall` fields.
const CALL_INPUTS: i32 = 0;
const CALL_OUTPUTS: i32 = 8;
const CALL_WEIGHTS: i32 = 16;
const CALL_ARENA: i32 = 24;
const CALL_SYMBOLS: i32 = 32;
const CALL_PARALLEL_FOR: i32 = 40;
const CALL_PARALLEL_CTX: i32 = 48;

/// Where a tensor lives at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loc {
    Input(usize),
    Output(usize),
    /// Byte offset in the WEIGHTS section.
    Weight(u64),
    /// Byte offset in the arena.
    Arena(u64),
    /// Base pointer `i` of the function's parameter block (see the module comment).
    Param(u32),
}

/// Replaces each distinct location among `locs` by `Loc::Param(i)`, numbered in order of first
/// appearance, and returns the originals: the parameter block a caller passes to the shared
/// function. Kernels equal after this differ only in where their tensors live.
pub fn parameterise<'l>(locs: impl IntoIterator<Item = &'l mut Loc>) -> Vec<Loc> {
    let mut params: Vec<Loc> = Vec::new();
    for l in locs {
        let i = params.iter().position(|p| p == l).unwrap_or_else(|| {
            params.push(*l);
            params.len() - 1
        });
        *l = Loc::Param(i as u32);
    }
    params
}

/// The scalar Cranelift type a dtype computes in (bool is an i8 holding 0 or 1).
pub fn scalar_type(dt: DType) -> Type {
    match dt {
        DType::F32 => types::F32,
        DType::F64 => types::F64,
        DType::I8 | DType::U8 | DType::Bool => types::I8,
        DType::I32 => types::I32,
        DType::I64 => types::I64,
    }
}

pub struct Kb<'a> {
    pub fb: FunctionBuilder<'a>,
    pub target: &'a Target,
    call: Value,
    /// The parameter block (none in the entry point, which gets `call` itself).
    block: Option<Value>,
    symbols: &'a [String],
    /// Parameters after `call` (a task's `begin`, `end`).
    pub params: Vec<Value>,
}

/// Loads of memory that no store in the kernel writes (a matmul's operands): also `readonly` and
/// `can_move`, which makes them pure to Cranelift's optimizer, so each is placed next to its use
/// instead of all loads of a k step first. On the 6-row f32 tile this took 32x576 @ 576x1536
/// from 2.06 to 1.73 ms (fewer values live across the step).
pub fn mem_ro() -> MemFlagsData {
    mem().with_readonly().with_can_move()
}

/// Accesses that cannot trap: the plan guarantees bounds.
pub fn mem() -> MemFlagsData {
    // Not `aligned`: vectors are only element-aligned, and SSE folds aligned loads into ops that
    // fault on misaligned addresses.
    MemFlagsData::new().with_notrap()
}

impl<'a> Kb<'a> {
    /// Starts a shared function's body: `fb` must be fresh for a function whose first argument is
    /// a parameter block.
    pub fn new(fb: FunctionBuilder<'a>, target: &'a Target, symbols: &'a [String]) -> Kb<'a> {
        let mut kb = Kb::new_entry(fb, target, symbols);
        let block = kb.call;
        kb.call = kb.fb.ins().load(types::I64, mem(), block, 0);
        kb.block = Some(block);
        kb
    }

    /// Starts the entry point's body, whose argument is the `EdgecCall` itself.
    pub fn new_entry(mut fb: FunctionBuilder<'a>, target: &'a Target, symbols: &'a [String]) -> Kb<'a> {
        let entry = fb.create_block();
        fb.append_block_params_for_function_params(entry);
        fb.switch_to_block(entry);
        let params = fb.block_params(entry).to_vec();
        Kb { fb, target, call: params[0], block: None, symbols, params: params[1..].to_vec() }
    }

    /// A parameter block on this function's stack for a call of a shared function: `call`, then
    /// the base address of each of `params`. It lives until this function returns.
    pub fn param_block(&mut self, params: &[Loc]) -> Value {
        use cranelift_codegen::ir::{StackSlotData, StackSlotKind};
        let slot = self.fb.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            8 * (1 + params.len() as u32),
            3,
        ));
        let call = self.call;
        self.fb.ins().stack_store(types::I64, call, slot, 0);
        for (i, &p) in params.iter().enumerate() {
            let b = self.base(p);
            self.fb.ins().stack_store(types::I64, b, slot, 8 * (1 + i as i32));
        }
        self.fb.ins().stack_addr(types::I64, slot, 0)
    }

    /// The runtime's `parallel_for` callback and its context (null when running serially).
    pub fn parallel_for(&mut self) -> (Value, Value) {
        let f = self.fb.ins().load(types::I64, mem(), self.call, CALL_PARALLEL_FOR);
        let c = self.fb.ins().load(types::I64, mem(), self.call, CALL_PARALLEL_CTX);
        (f, c)
    }

    pub fn finish(mut self) {
        self.fb.ins().return_(&[]);
        self.fb.seal_all_blocks();
        let cfg = self.target.isa.frontend_config();
        self.fb.finalize(cfg);
    }

    pub fn iconst(&mut self, v: i64) -> Value {
        self.fb.ins().iconst(types::I64, v)
    }

    /// A symbol's run-time value.
    pub fn symbol(&mut self, name: &str) -> Value {
        let idx = self.symbols.iter().position(|s| s == name).expect("planner checked every symbol is bound");
        let table = self.fb.ins().load(types::I64, mem(), self.call, CALL_SYMBOLS);
        self.fb.ins().load(types::I64, mem(), table, (idx * 8) as i32)
    }

    /// A dimension polynomial evaluated at run time (i64).
    pub fn dim(&mut self, d: &Dim) -> Value {
        if let Some(v) = d.as_fixed() {
            return self.iconst(v);
        }
        let mut acc: Option<Value> = None;
        for (coef, syms) in d.terms() {
            let mut t = self.iconst(*coef);
            for s in syms {
                let v = self.symbol(s);
                t = self.fb.ins().imul(t, v);
            }
            acc = Some(match acc {
                Some(a) => self.fb.ins().iadd(a, t),
                None => t,
            });
        }
        acc.unwrap_or_else(|| self.iconst(0))
    }

    /// Base address of a buffer.
    pub fn base(&mut self, loc: Loc) -> Value {
        let ins = self.fb.ins();
        match loc {
            Loc::Input(i) => {
                let t = ins.load(types::I64, mem(), self.call, CALL_INPUTS);
                self.fb.ins().load(types::I64, mem(), t, (i * 8) as i32)
            }
            Loc::Output(i) => {
                let t = ins.load(types::I64, mem(), self.call, CALL_OUTPUTS);
                self.fb.ins().load(types::I64, mem(), t, (i * 8) as i32)
            }
            Loc::Weight(off) => {
                let w = ins.load(types::I64, mem(), self.call, CALL_WEIGHTS);
                self.fb.ins().iadd_imm_s(w, off as i64)
            }
            Loc::Arena(off) => {
                let a = ins.load(types::I64, mem(), self.call, CALL_ARENA);
                self.fb.ins().iadd_imm_s(a, off as i64)
            }
            Loc::Param(i) => {
                let block = self.block.expect("only shared functions read parameters");
                ins.load(types::I64, mem(), block, 8 * (1 + i as i32))
            }
        }
    }

    /// `base + index * size` (index in elements, i64).
    pub fn elem_addr(&mut self, base: Value, index: Value, size: usize) -> Value {
        let off = self.fb.ins().imul_imm_s(index, size as i64);
        self.fb.ins().iadd(base, off)
    }

    pub fn load(&mut self, dt: DType, addr: Value, offset: i32) -> Value {
        self.fb.ins().load(scalar_type(dt), mem(), addr, offset)
    }

    pub fn store(&mut self, v: Value, addr: Value, offset: i32) {
        self.fb.ins().store(mem(), v, addr, offset);
    }

    /// `for i in (start..end).step_by(step) { body(i) }` over whole steps; `body` may emit nested
    /// loops.
    pub fn for_range(&mut self, start: Value, end: Value, step: i64, body: impl FnOnce(&mut Self, Value)) {
        self.for_steps(start, end, step, body);
    }

    /// Rows [0, m) as blocks of `rows` (`body(i, rows)`), then the rest one at a time
    /// (`body(i, 1)`): how every matmul kernel walks the rows of A against one column panel.
    pub fn row_blocks(&mut self, m: Value, rows: usize, mut body: impl FnMut(&mut Self, Value, usize)) {
        let zero = self.iconst(0);
        let end = if rows > 1 { self.for_steps(zero, m, rows as i64, |kb, i| body(kb, i, rows)) } else { zero };
        self.for_range(end, m, 1, |kb, i| body(kb, i, 1));
    }

    /// Like `for_range` but also returns the first index not covered (`start + k*step`).
    pub fn for_steps(&mut self, start: Value, end: Value, step: i64, body: impl FnOnce(&mut Self, Value)) -> Value {
        self.fold_range(start, end, step, &[], |kb, i, _| {
            body(kb, i);
            Vec::new()
        })
        .0
    }

    /// A loop carrying values: `init` flows in, `body(i, carried) -> carried'` per iteration, and
    /// the index after the last whole step and the final carried values come out.
    ///
    /// The loop is rotated (test at the bottom, one guard in front), so each iteration costs one
    /// compare and one taken branch.
    pub fn fold_range(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        init: &[Value],
        body: impl FnOnce(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> (Value, Vec<Value>) {
        let body_block = self.fb.create_block();
        let exit = self.fb.create_block();
        self.fb.append_block_param(body_block, types::I64);
        self.fb.append_block_param(exit, types::I64);
        let tys: Vec<Type> = init.iter().map(|v| self.fb.func.dfg.value_type(*v)).collect();
        for &t in &tys {
            self.fb.append_block_param(body_block, t);
            self.fb.append_block_param(exit, t);
        }
        let first = self.fb.ins().iadd_imm_s(start, step);
        let go = self.fb.ins().icmp(IntCC::SignedLessThanOrEqual, first, end);
        let args: Vec<_> = std::iter::once(start).chain(init.iter().copied()).map(Into::into).collect();
        self.fb.ins().brif(go, body_block, &args, exit, &args);
        self.fb.switch_to_block(body_block);
        let params: Vec<Value> = self.fb.block_params(body_block).to_vec();
        let i = params[0];
        let out = body(self, i, &params[1..]);
        let next = self.fb.ins().iadd_imm_s(i, step);
        let last = self.fb.ins().iadd_imm_s(next, step);
        let more = self.fb.ins().icmp(IntCC::SignedLessThanOrEqual, last, end);
        let back: Vec<_> = std::iter::once(next).chain(out).map(Into::into).collect();
        self.fb.ins().brif(more, body_block, &back, exit, &back);
        self.fb.switch_to_block(exit);
        let p = self.fb.block_params(exit).to_vec();
        (p[0], p[1..].to_vec())
    }

    /// `if cond { then() }`.
    pub fn if_then(&mut self, cond: Value, then: impl FnOnce(&mut Self)) {
        let b: Block = self.fb.create_block();
        let done = self.fb.create_block();
        self.fb.ins().brif(cond, b, &[], done, &[]);
        self.fb.switch_to_block(b);
        then(self);
        self.fb.ins().jump(done, &[]);
        self.fb.switch_to_block(done);
    }
}

/// The body of a loop nest: gets the per-view element offsets and the loop indices.
pub type NestBody<'b, K> = dyn FnMut(&mut K, &[Value], &[Value]) + 'b;

impl Kb<'_> {
    /// Loops over every point of `dims` (outer to inner), carrying one element offset per view
    /// (`offs[v] + sum(i_a * strides[v][a])`), and calls `body` with the offsets and indices.
    pub fn loop_nest(
        &mut self,
        dims: &[Value],
        strides: &[Vec<Value>],
        offs: Vec<Value>,
        idx: &mut Vec<Value>,
        body: &mut NestBody<'_, Self>,
    ) {
        let axis = idx.len();
        if axis == dims.len() {
            body(self, &offs, idx);
            return;
        }
        let zero = self.iconst(0);
        self.for_range(zero, dims[axis], 1, |kb, i| {
            let offs: Vec<Value> = offs
                .iter()
                .zip(strides)
                .map(|(&o, s)| {
                    let d = kb.fb.ins().imul(i, s[axis]);
                    kb.fb.ins().iadd(o, d)
                })
                .collect();
            idx.push(i);
            kb.loop_nest(dims, strides, offs, idx, body);
            idx.pop();
        });
    }
}
