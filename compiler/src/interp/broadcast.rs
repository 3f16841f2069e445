//! Numpy-style broadcasting, shared by every elementwise op.

use crate::ir::tensor::strides;

/// The largest tensor the interpreter materialises (4 GiB of f32): a corrupt or
/// hostile shape becomes an error instead of an allocation failure.
pub const MAX_ELEMENTS: usize = 1 << 30;

pub fn check_size(shape: &[usize]) -> Result<(), String> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => Err(format!(
            "a tensor of shape {shape:?} is larger than the interpreter's limit of {MAX_ELEMENTS} elements"
        )),
    }
}

pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, String> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(format!("shapes {:?} cannot be broadcast together", shapes));
            }
        }
    }
    check_size(&out)?;
    Ok(out)
}

/// For every element of `out_shape`, the flat index of the element of an input of
/// shape `in_shape` (right-aligned, size-1 dims repeated) that it reads.
pub fn broadcast_index(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let n: usize = out_shape.iter().product();
    let in_n: usize = in_shape.iter().product();
    if in_shape == out_shape {
        return (0..n).collect();
    }
    if in_n == 1 {
        return vec![0; n];
    }
    let off = out_shape.len() - in_shape.len();
    let in_strides = strides(in_shape);
    // Stride per output axis: 0 where the input repeats along it.
    let st: Vec<usize> =
        (0..out_shape.len()).map(|i| if i < off || in_shape[i - off] == 1 { 0 } else { in_strides[i - off] }).collect();
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; out_shape.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        idx.push(cur);
        // Odometer increment, updating the input offset incrementally.
        for ax in (0..out_shape.len()).rev() {
            counter[ax] += 1;
            cur += st[ax];
            if counter[ax] < out_shape[ax] {
                break;
            }
            cur -= st[ax] * counter[ax];
            counter[ax] = 0;
        }
    }
    idx
}

/// Applies `f` elementwise over two broadcast inputs.
pub fn zip_broadcast<A: Copy, B: Copy, R>(
    a: &[A],
    a_shape: &[usize],
    b: &[B],
    b_shape: &[usize],
    out_shape: &[usize],
    f: impl Fn(A, B) -> R,
) -> Vec<R> {
    if a_shape == out_shape && b_shape == out_shape {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    if a_shape == out_shape && b.len() == 1 {
        let y = b[0];
        return a.iter().map(|&x| f(x, y)).collect();
    }
    let ia = broadcast_index(a_shape, out_shape);
    let ib = broadcast_index(b_shape, out_shape);
    ia.iter().zip(&ib).map(|(&i, &j)| f(a[i], b[j])).collect()
}
