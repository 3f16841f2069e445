//! Small dense f64 linear algebra for layer-wise compression (Cholesky, SPD solves, the inverse
//! factor OBS-style pruning and GPTQ update with). Matrices are row-major `n × n` slices.

/// Dot product with independent accumulators (so the loop vectorises without fast-math).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            s[l] += x[l] * y[l];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

/// `H + λ·mean(diag(H))·I`, with channels that never fired (zero diagonal) given a unit diagonal so
/// the matrix stays positive definite (their weights multiply zeros: any value is optimal).
pub fn damped(h: &[f64], n: usize, rel: f64) -> Vec<f64> {
    let mut a = h.to_vec();
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let add = rel * if mean > 0.0 { mean } else { 1.0 };
    for i in 0..n {
        if a[i * n + i] <= 0.0 {
            a[i * n + i] = 1.0;
        }
        a[i * n + i] += add;
    }
    a
}

/// In-place lower Cholesky factor `A = L·Lᵀ` (the upper triangle is zeroed).
pub fn cholesky(a: &mut [f64], n: usize) -> Result<(), String> {
    for i in 0..n {
        for j in 0..=i {
            let s = dot(&a[i * n..i * n + j], &a[j * n..j * n + j]);
            let v = a[i * n + j] - s;
            if i == j {
                if v.is_nan() || v <= 0.0 || !v.is_finite() {
                    return Err(format!("matrix is not positive definite (pivot {i} = {v:e})"));
                }
                a[i * n + i] = v.sqrt();
            } else {
                a[i * n + j] = v / a[j * n + j];
            }
        }
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// Solves `A·X = B` for SPD `A` given its lower Cholesky factor; `b` is `n × m` row-major, overwritten.
pub fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64], m: usize) {
    // L·Y = B (forward), row by row: Y_i = (B_i - Σ_{j<i} L_ij Y_j) / L_ii.
    for i in 0..n {
        let (done, rest) = b.split_at_mut(i * m);
        let bi = &mut rest[..m];
        for j in 0..i {
            let c = l[i * n + j];
            if c != 0.0 {
                for (x, &y) in bi.iter_mut().zip(&done[j * m..j * m + m]) {
                    *x -= c * y;
                }
            }
        }
        let d = l[i * n + i];
        bi.iter_mut().for_each(|x| *x /= d);
    }
    // Lᵀ·X = Y (backward).
    for i in (0..n).rev() {
        let (head, tail) = b.split_at_mut((i + 1) * m);
        let bi = &mut head[i * m..];
        for j in i + 1..n {
            let c = l[j * n + i];
            if c != 0.0 {
                for (x, &y) in bi.iter_mut().zip(&tail[(j - i - 1) * m..(j - i) * m]) {
                    *x -= c * y;
                }
            }
        }
        let d = l[i * n + i];
        bi.iter_mut().for_each(|x| *x /= d);
    }
}

/// The upper-triangular `U` with `A⁻¹ = Uᵀ·U` (what OBS / SparseGPT / GPTQ step through: row `i` of
/// `U` spreads the error of removing weight `i` over weights `i+1..`, and `U_ii² = 1/[A⁻¹ restricted
/// to i..]⁻¹_ii`). Computed without forming `A⁻¹`: with `J` the exchange matrix, the Cholesky factor
/// of `J·A·J` gives `A = R·Rᵀ` with `R = J·L·J` upper, so `A⁻¹ = R⁻ᵀ·R⁻¹` and `U = R⁻¹`.
pub fn inverse_upper_factor(a: &[f64], n: usize) -> Result<Vec<f64>, String> {
    let mut r = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            r[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    cholesky(&mut r, n)?;
    // R = J·L·J (upper). Invert the lower L in place by columns, then flip: (J L J)⁻¹ = J L⁻¹ J.
    let linv = lower_inverse(&r, n);
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = linv[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    Ok(u)
}

/// `b ← Uᵀ·U·b` (= `A⁻¹·b` for the `U` of `inverse_upper_factor(A)`); `b` is `n × m` row-major.
pub fn inverse_apply(u: &[f64], n: usize, b: &mut [f64], m: usize) {
    // y = U·b: row i of y only needs rows i.. of b, so go top-down in place.
    for i in 0..n {
        let (head, tail) = b.split_at_mut((i + 1) * m);
        let bi = &mut head[i * m..];
        let d = u[i * n + i];
        bi.iter_mut().for_each(|x| *x *= d);
        for j in i + 1..n {
            let c = u[i * n + j];
            if c != 0.0 {
                for (x, &y) in bi.iter_mut().zip(&tail[(j - i - 1) * m..(j - i) * m]) {
                    *x += c * y;
                }
            }
        }
    }
    // z = Uᵀ·y: row i of z needs rows ..=i of y, so go bottom-up in place.
    for i in (0..n).rev() {
        let (head, tail) = b.split_at_mut(i * m);
        let bi = &mut tail[..m];
        let d = u[i * n + i];
        bi.iter_mut().for_each(|x| *x *= d);
        for j in 0..i {
            let c = u[j * n + i];
            if c != 0.0 {
                for (x, &y) in bi.iter_mut().zip(&head[j * m..j * m + m]) {
                    *x += c * y;
                }
            }
        }
    }
}

/// Inverse of a lower-triangular matrix.
fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    // Row i of X = L⁻¹: X_ii = 1/L_ii, X_ij = -(Σ_{j<=k<i} L_ik X_kj) / L_ii, done as row updates.
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        let d = l[i * n + i];
        let mut row = vec![0f64; i + 1];
        for k in 0..i {
            let c = l[i * n + k];
            if c != 0.0 {
                for (rv, &xv) in row[..=k].iter_mut().zip(&x[k * n..k * n + k + 1]) {
                    *rv -= c * xv;
                }
            }
        }
        row[i] = 1.0;
        for (j, v) in row.into_iter().enumerate() {
            x[i * n + j] = v / d;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        let m: Vec<f64> = (0..n * n).map(|i| ((i * 7919 % 97) as f64 / 97.0) - 0.5).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] =
                    (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum::<f64>() + if i == j { 0.1 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn solve_and_inverse_factor_agree_with_the_matrix() {
        let n = 9;
        let a = spd(n);
        let mut l = a.clone();
        cholesky(&mut l, n).unwrap();
        let x_true: Vec<f64> = (0..n * 2).map(|i| i as f64 - 4.0).collect();
        let mut b = vec![0.0; n * 2];
        for i in 0..n {
            for c in 0..2 {
                b[i * 2 + c] = (0..n).map(|k| a[i * n + k] * x_true[k * 2 + c]).sum();
            }
        }
        cholesky_solve(&l, n, &mut b, 2);
        for (g, w) in b.iter().zip(&x_true) {
            assert!((g - w).abs() < 1e-8, "{g} vs {w}");
        }
        // Uᵀ·U·A = I.
        let u = inverse_upper_factor(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let v: f64 =
                    (0..n).map(|k| (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum::<f64>() * a[k * n + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "({i},{j}) = {v}");
            }
        }
        assert!((0..n).all(|i| (0..i).all(|j| u[i * n + j] == 0.0)), "U is upper triangular");
        // inverse_apply solves like cholesky_solve.
        let mut b2 = vec![0.0; n * 2];
        for i in 0..n {
            for c in 0..2 {
                b2[i * 2 + c] = (0..n).map(|k| a[i * n + k] * x_true[k * 2 + c]).sum();
            }
        }
        inverse_apply(&u, n, &mut b2, 2);
        for (g, w) in b2.iter().zip(&x_true) {
            assert!((g - w).abs() < 1e-8, "{g} vs {w}");
        }
    }

    #[test]
    fn not_positive_definite_is_an_error() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky(&mut a, 2).is_err());
    }
}
