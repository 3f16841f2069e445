//! Float math emitted inline, for scalars (f32, f64) and f32x4 alike: the artifact calls no libm.
//!
//! Rounding uses the add-and-subtract-1.5*2^mantissa trick instead of round/floor instructions,
//! which baseline x86_64 (SSE2) lacks, so the same code works on every target. Polynomials are
//! Taylor/odd-series chosen for ~1e-7 relative error in f32 (f64 gets more terms where cheap).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};

use super::emit::Kb;

pub struct Fm<'k, 'a> {
    pub kb: &'k mut Kb<'a>,
    /// F32, F64 or F32X4.
    pub ty: Type,
}

impl<'k, 'a> Fm<'k, 'a> {
    pub fn new(kb: &'k mut Kb<'a>, ty: Type) -> Self {
        Fm { kb, ty }
    }
    fn f64(&self) -> bool {
        self.ty.lane_type() == types::F64
    }
    fn ity(&self) -> Type {
        self.ty.as_int()
    }
    pub fn c(&mut self, v: f64) -> Value {
        let lane = self.ty.lane_type();
        let s = if lane == types::F64 { self.kb.fb.ins().f64const(v) } else { self.kb.fb.ins().f32const(v as f32) };
        if self.ty.is_vector() {
            self.kb.fb.ins().splat(self.ty, s)
        } else {
            s
        }
    }
    fn ic(&mut self, v: i64) -> Value {
        let ity = self.ity();
        let s = self.kb.fb.ins().iconst(ity.lane_type(), v);
        if ity.is_vector() {
            self.kb.fb.ins().splat(ity, s)
        } else {
            s
        }
    }
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fadd(a, b)
    }
    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fsub(a, b)
    }
    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fmul(a, b)
    }
    pub fn div(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fdiv(a, b)
    }
    /// a*b + c, fused where the target has it.
    pub fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.kb.target.fma() {
            self.kb.fb.ins().fma(a, b, c)
        } else {
            let p = self.kb.fb.ins().fmul(a, b);
            self.kb.fb.ins().fadd(p, c)
        }
    }
    pub fn neg(&mut self, a: Value) -> Value {
        self.kb.fb.ins().fneg(a)
    }
    pub fn abs(&mut self, a: Value) -> Value {
        self.kb.fb.ins().fabs(a)
    }
    /// A comparison as a select mask (i8 for scalars, lane mask for vectors).
    pub fn cmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fcmp(cc, a, b)
    }
    pub fn sel(&mut self, mask: Value, a: Value, b: Value) -> Value {
        if self.ty.is_vector() {
            let m = self.kb.fb.ins().bitcast(self.ty, MemFlagsData::new(), mask);
            self.kb.fb.ins().bitselect(m, a, b)
        } else {
            self.kb.fb.ins().select(mask, a, b)
        }
    }
    /// Combines two masks with `and`.
    pub fn and_mask(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().band(a, b)
    }
    pub fn or_mask(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().bor(a, b)
    }
    /// min/max that return the other operand when one is NaN-free: plain IEEE min/max via compare
    /// and select (Cranelift's fmin propagates NaN, as ONNX Min/Max do).
    pub fn min(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fmin(a, b)
    }
    pub fn max(&mut self, a: Value, b: Value) -> Value {
        self.kb.fb.ins().fmax(a, b)
    }
    fn bits_of(&mut self, a: Value) -> Value {
        let ity = self.ity();
        self.kb.fb.ins().bitcast(ity, MemFlagsData::new(), a)
    }
    fn float_of_bits(&mut self, a: Value) -> Value {
        self.kb.fb.ins().bitcast(self.ty, MemFlagsData::new(), a)
    }
    fn magic(&self) -> f64 {
        if self.f64() {
            6755399441055744.0 // 1.5 * 2^52
        } else {
            12582912.0 // 1.5 * 2^23
        }
    }
    /// Round half to even, exact for |x| < 2^22 (f32) / 2^51 (f64); other values are returned as is
    /// (they are already integers, or NaN/inf).
    pub fn round(&mut self, x: Value) -> Value {
        let m = self.magic();
        let big = if self.f64() { 4503599627370496.0 } else { 8388608.0 };
        let ax = self.abs(x);
        let cm = self.c(m);
        let t = self.add(ax, cm);
        let r = self.sub(t, cm);
        let r = self.copysign(r, x);
        let cbig = self.c(big);
        let small = self.cmp(FloatCC::LessThan, ax, cbig);
        self.sel(small, r, x)
    }
    pub fn floor(&mut self, x: Value) -> Value {
        let r = self.round(x);
        let gt = self.cmp(FloatCC::GreaterThan, r, x);
        let one = self.c(1.0);
        let rm = self.sub(r, one);
        self.sel(gt, rm, r)
    }
    pub fn ceil(&mut self, x: Value) -> Value {
        let r = self.round(x);
        let lt = self.cmp(FloatCC::LessThan, r, x);
        let one = self.c(1.0);
        let rp = self.add(r, one);
        self.sel(lt, rp, r)
    }
    pub fn trunc(&mut self, x: Value) -> Value {
        let ax = self.abs(x);
        let f = self.floor(ax);
        self.copysign(f, x)
    }
    /// |a| with b's sign bit.
    pub fn copysign(&mut self, a: Value, b: Value) -> Value {
        let sign: i64 = if self.f64() { i64::MIN } else { 0x8000_0000u32 as i32 as i64 };
        let ab = self.bits_of(a);
        let bb = self.bits_of(b);
        let sm = self.ic(sign);
        let bs = self.kb.fb.ins().band(bb, sm);
        let nsm = self.kb.fb.ins().bnot(sm);
        let am = self.kb.fb.ins().band(ab, nsm);
        let r = self.kb.fb.ins().bor(am, bs);
        self.float_of_bits(r)
    }
    fn poly(&mut self, x: Value, coefs: &[f64]) -> Value {
        // Horner from the highest coefficient.
        let mut acc = self.c(*coefs.last().unwrap());
        for &c in coefs.iter().rev().skip(1) {
            let cc = self.c(c);
            acc = self.fma(acc, x, cc);
        }
        acc
    }
    /// 2^n for integer-valued n inside the normal exponent range.
    fn pow2(&mut self, n: Value) -> Value {
        // n + magic puts n into the low mantissa bits; subtract the magic's bits to get n as int.
        let m = self.magic();
        let cm = self.c(m);
        let t = self.add(n, cm);
        let tb = self.bits_of(t);
        let mb = self.bits_of(cm);
        let ni = self.kb.fb.ins().isub(tb, mb);
        let (bias, shift) = if self.f64() { (1023, 52) } else { (127, 23) };
        let cb = self.ic(bias);
        let e = self.kb.fb.ins().iadd(ni, cb);
        let e = self.kb.fb.ins().ishl_imm_s(e, shift);
        self.float_of_bits(e)
    }
    pub fn exp(&mut self, x: Value) -> Value {
        // Past hi the result overflows to inf; below lo it is clamped to a tiny normal value.
        let (lo, hi) = if self.f64() { (-707.0, 710.0) } else { (-86.0, 89.0) };
        let clo = self.c(lo);
        let chi = self.c(hi);
        // NaN stays NaN through max/min (Cranelift's fmin/fmax propagate it).
        let xc = self.max(x, clo);
        let xc = self.min(xc, chi);
        let l2e = self.c(std::f64::consts::LOG2_E);
        let t = self.mul(xc, l2e);
        let n = self.round(t);
        // r = x - n*ln2 in two parts (Cody-Waite) so r stays exact-ish.
        let (ln2_hi, ln2_lo) = if self.f64() {
            (6.931_471_803_691_238e-1, 1.908_214_929_270_587_7e-10)
        } else {
            (0.693145751953125, 1.428606765330187e-06)
        };
        let chi2 = self.c(-ln2_hi);
        let clo2 = self.c(-ln2_lo);
        let r = self.fma(n, chi2, xc);
        let r = self.fma(n, clo2, r);
        let terms = if self.f64() { 12 } else { 7 };
        let mut coefs = Vec::with_capacity(terms);
        let mut f = 1.0;
        for k in 0..terms {
            if k > 0 {
                f /= k as f64;
            }
            coefs.push(f);
        }
        let p = self.poly(r, &coefs);
        // 2^(n-1) * 2 keeps n = 128 (f32) representable until the final multiply overflows.
        let one = self.c(1.0);
        let nm1 = self.sub(n, one);
        let s = self.pow2(nm1);
        let two = self.c(2.0);
        let ps = self.mul(p, s);
        self.mul(ps, two)
    }
    /// Natural log: NaN below 0, -inf at 0, +inf at +inf.
    pub fn log(&mut self, x: Value) -> Value {
        let f64 = self.f64();
        let (shift, bias, mant_mask, one_bits) = if f64 {
            (52, 1023i64, (1i64 << 52) - 1, 0x3ff0_0000_0000_0000i64)
        } else {
            (23, 127, (1 << 23) - 1, 0x3f80_0000)
        };
        // Subnormals: scale up by 2^k first (k = 64 / 24) and correct the exponent.
        let (scale, scale_log) = if f64 { (2f64.powi(64), 64.0) } else { (2f64.powi(24), 24.0) };
        let tiny = if f64 { f64::MIN_POSITIVE } else { f32::MIN_POSITIVE as f64 };
        let ctiny = self.c(tiny);
        let is_sub = self.cmp(FloatCC::LessThan, x, ctiny);
        let cs = self.c(scale);
        let xs = self.mul(x, cs);
        let xn = self.sel(is_sub, xs, x);
        let zero = self.c(0.0);
        let cl = self.c(scale_log);
        let eadj = self.sel(is_sub, cl, zero);
        let bits = self.bits_of(xn);
        let e = self.kb.fb.ins().ushr_imm_s(bits, shift);
        let cbias = self.ic(bias);
        let e = self.kb.fb.ins().isub(e, cbias);
        let mm = self.ic(mant_mask);
        let m = self.kb.fb.ins().band(bits, mm);
        let ob = self.ic(one_bits);
        let m = self.kb.fb.ins().bor(m, ob);
        let m = self.float_of_bits(m); // in [1, 2)
        let ef = self.int_to_float(e);
        let ef = self.sub(ef, eadj);
        // Move m into [sqrt(1/2), sqrt(2)).
        let csq = self.c(std::f64::consts::SQRT_2);
        let big = self.cmp(FloatCC::GreaterThan, m, csq);
        let half = self.c(0.5);
        let mh = self.mul(m, half);
        let m = self.sel(big, mh, m);
        let one = self.c(1.0);
        let ep = self.add(ef, one);
        let ef = self.sel(big, ep, ef);
        // log(m) = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172.
        let num = self.sub(m, one);
        let den = self.add(m, one);
        let s = self.div(num, den);
        let s2 = self.mul(s, s);
        let n = if f64 { 10 } else { 5 };
        let coefs: Vec<f64> = (0..n).map(|k| 2.0 / (2 * k + 1) as f64).collect();
        let p = self.poly(s2, &coefs);
        let lm = self.mul(p, s);
        let ln2 = self.c(std::f64::consts::LN_2);
        let r = self.fma(ef, ln2, lm);
        // Special values.
        let inf = self.c(f64::INFINITY);
        let ninf = self.c(f64::NEG_INFINITY);
        let nan = self.c(f64::NAN);
        let is_inf = self.cmp(FloatCC::Equal, x, inf);
        let r = self.sel(is_inf, inf, r);
        let is_zero = self.cmp(FloatCC::Equal, x, zero);
        let r = self.sel(is_zero, ninf, r);
        let is_neg = self.cmp(FloatCC::LessThan, x, zero);
        let r = self.sel(is_neg, nan, r);
        let is_nan = self.cmp(FloatCC::Unordered, x, x);
        self.sel(is_nan, x, r)
    }
    fn int_to_float(&mut self, i: Value) -> Value {
        self.kb.fb.ins().fcvt_from_sint(self.ty, i)
    }
    pub fn sigmoid(&mut self, x: Value) -> Value {
        let nx = self.neg(x);
        let e = self.exp(nx);
        let one = self.c(1.0);
        let d = self.add(one, e);
        self.div(one, d)
    }
    pub fn tanh(&mut self, x: Value) -> Value {
        let ax = self.abs(x);
        // Small |x|: odd Taylor series (cancellation-free); else 1 - 2/(e^{2|x|}+1).
        let x2 = self.mul(x, x);
        let coefs = [1.0, -1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0, 62.0 / 2835.0, -1382.0 / 155925.0];
        let p = self.poly(x2, &coefs);
        let small_v = self.mul(p, x);
        let two = self.c(2.0);
        let a2 = self.mul(ax, two);
        let e = self.exp(a2);
        let one = self.c(1.0);
        let d = self.add(e, one);
        let q = self.div(two, d);
        let big = self.sub(one, q);
        let big = self.copysign(big, x);
        let thr = self.c(0.3);
        let is_small = self.cmp(FloatCC::LessThan, ax, thr);
        let r = self.sel(is_small, small_v, big);
        let is_nan = self.cmp(FloatCC::Unordered, x, x);
        self.sel(is_nan, x, r)
    }
    pub fn erf(&mut self, x: Value) -> Value {
        let ax = self.abs(x);
        // |x| < 1: Maclaurin series of erf(x)/x in x^2.
        let x2 = self.mul(x, x);
        let mut coefs = Vec::new();
        let mut fact = 1.0;
        let terms = if self.f64() { 16 } else { 10 };
        for n in 0..terms {
            if n > 0 {
                fact *= n as f64;
            }
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            coefs.push(sign * 2.0 / std::f64::consts::PI.sqrt() / ((2 * n + 1) as f64 * fact));
        }
        let p = self.poly(x2, &coefs);
        let small_v = self.mul(p, x);
        // |x| >= 1: erfc(x) = t*exp(-x^2 + P(t)), t = 1/(1+|x|/2) (Numerical Recipes' erfcc, ~1.2e-7).
        let one = self.c(1.0);
        let half = self.c(0.5);
        let d = self.fma(ax, half, one);
        let t = self.div(one, d);
        let nr = [
            -1.26551223,
            1.00002368,
            0.37409196,
            0.09678418,
            -0.18628806,
            0.27886807,
            -1.13520398,
            1.48851587,
            -0.82215223,
            0.17087277,
        ];
        let q = self.poly(t, &nr);
        let nx2 = self.neg(x2);
        let arg = self.add(nx2, q);
        let e = self.exp(arg);
        let erfc = self.mul(t, e);
        let big = self.sub(one, erfc);
        let big = self.copysign(big, x);
        let is_small = self.cmp(FloatCC::LessThan, ax, one);
        let r = self.sel(is_small, small_v, big);
        let is_nan = self.cmp(FloatCC::Unordered, x, x);
        self.sel(is_nan, x, r)
    }
    /// sin (cos when `cos`): reduction by pi/2 in three parts, then the quadrant's polynomial.
    pub fn sin_cos(&mut self, x: Value, cos: bool) -> Value {
        let inv = self.c(std::f64::consts::FRAC_2_PI);
        let t = self.mul(x, inv);
        let n = self.round(t);
        let (p1, p2, p3) = if self.f64() {
            (1.5707963267341256e+00, 6.077100506506192e-11, 2.0222662487959506e-21)
        } else {
            (1.5703125, 4.837512969970703e-4, 7.549789948768648e-8)
        };
        let c1 = self.c(-p1);
        let c2 = self.c(-p2);
        let c3 = self.c(-p3);
        let r = self.fma(n, c1, x);
        let r = self.fma(n, c2, r);
        let r = self.fma(n, c3, r);
        let r2 = self.mul(r, r);
        let sin_c: Vec<f64> = (0..8).map(|k| (if k % 2 == 0 { 1.0 } else { -1.0 }) / factorial(2 * k + 1)).collect();
        let cos_c: Vec<f64> = (0..8).map(|k| (if k % 2 == 0 { 1.0 } else { -1.0 }) / factorial(2 * k)).collect();
        let ps = self.poly(r2, &sin_c);
        let s = self.mul(ps, r);
        let c = self.poly(r2, &cos_c);
        // Quadrant q = n mod 4 (+1 for cos): bit 0 picks cos/sin, bit 1 negates.
        let m = self.magic();
        let cm = self.c(m);
        let tq = self.add(n, cm);
        let qb = self.bits_of(tq);
        let qb = if cos {
            let one = self.ic(1);
            self.kb.fb.ins().iadd(qb, one)
        } else {
            qb
        };
        let one = self.ic(1);
        let two = self.ic(2);
        let zero = self.ic(0);
        let b0 = self.kb.fb.ins().band(qb, one);
        let use_cos = self.kb.fb.ins().icmp(IntCC::NotEqual, b0, zero);
        let b1 = self.kb.fb.ins().band(qb, two);
        let negate = self.kb.fb.ins().icmp(IntCC::NotEqual, b1, zero);
        let v = self.sel(use_cos, c, s);
        let nv = self.neg(v);
        self.sel(negate, nv, v)
    }
    /// a^b with C pow's special cases for the common ones (negative base with integer exponent).
    pub fn pow(&mut self, a: Value, b: Value) -> Value {
        let aa = self.abs(a);
        let la = self.log(aa);
        let p = self.mul(b, la);
        let r = self.exp(p);
        // Integer exponent? Odd?
        let rb = self.round(b);
        let is_int = self.cmp(FloatCC::Equal, rb, b);
        let half = self.c(0.5);
        let hb = self.mul(rb, half);
        let rhb = self.round(hb);
        let is_odd = self.cmp(FloatCC::NotEqual, rhb, hb);
        let zero = self.c(0.0);
        let neg_base = self.cmp(FloatCC::LessThan, a, zero);
        let nr = self.neg(r);
        let signed = self.sel(is_odd, nr, r);
        let nan = self.c(f64::NAN);
        let negv = self.sel(is_int, signed, nan);
        let r = self.sel(neg_base, negv, r);
        // b == 0 -> 1 (even for NaN a); a == 0 handled by exp(-inf)=0 / exp(inf)=inf up to sign.
        let one = self.c(1.0);
        let b0 = self.cmp(FloatCC::Equal, b, zero);
        self.sel(b0, one, r)
    }
}

fn factorial(n: u32) -> f64 {
    (1..=n).map(|k| k as f64).product()
}
