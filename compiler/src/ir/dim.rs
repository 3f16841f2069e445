//! Tensor dimensions that are either fixed or symbolic.
//!
//! A dimension is a polynomial with integer coefficients over named symbols
//! (`batch`, `seq`, `past`, ...), kept in a canonical form so that `seq+past`
//! computed along two different paths compares equal. Shape arithmetic in
//! exported graphs (Shape -> Gather -> Add -> Concat -> Reshape) only ever adds,
//! subtracts and multiplies dims, or divides them by constants, which this form
//! represents exactly.

use std::collections::BTreeMap;
use std::fmt;

/// A product of symbols, sorted; the empty product is the constant term.
type Monomial = Vec<String>;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    terms: BTreeMap<Monomial, i64>,
}

impl Dim {
    pub fn fixed(v: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if v != 0 {
            terms.insert(Vec::new(), v);
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(vec![name.to_string()], 1);
        Dim { terms }
    }

    /// The value when the dimension does not depend on any symbol.
    pub fn as_fixed(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    pub fn is_fixed(&self) -> bool {
        self.as_fixed().is_some()
    }

    /// The terms `(coefficient, symbols)`, in canonical order.
    pub fn terms(&self) -> impl Iterator<Item = (&i64, &Vec<String>)> {
        self.terms.iter().map(|(m, c)| (c, m))
    }

    /// An upper bound for symbols in `1..=max(symbol)`: negative terms dropped, symbols at their maxima.
    pub fn upper_bound(&self, max: &dyn Fn(&str) -> i64) -> Option<i64> {
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut t = *c;
            for s in m {
                t = t.checked_mul(max(s))?;
            }
            total = total.checked_add(t.max(0))?;
        }
        Some(total)
    }

    /// Symbols this dimension depends on.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().flat_map(|m| m.iter().map(|s| s.as_str()))
    }

    fn normalized(mut self) -> Dim {
        self.terms.retain(|_, c| *c != 0);
        self
    }

    /// Exact division: `Some` only when the result is again a polynomial with integer
    /// coefficients (constant divisor dividing every coefficient, or a divisor that
    /// is a single term dividing every term).
    fn div_exact(&self, other: &Dim) -> Option<Dim> {
        if let Some(d) = other.as_fixed() {
            if d == 0 {
                return None;
            }
            if self.terms.values().all(|c| c % d == 0) {
                return Some(Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / d)).collect() });
            }
            return None;
        }
        if other.terms.len() != 1 {
            return (self == other).then(|| Dim::fixed(1));
        }
        let (dm, dc) = other.terms.iter().next().unwrap();
        let mut terms = BTreeMap::new();
        for (m, c) in &self.terms {
            if c % dc != 0 {
                return None;
            }
            let mut rest = m.clone();
            for s in dm {
                let pos = rest.iter().position(|x| x == s)?;
                rest.remove(pos);
            }
            terms.insert(rest, c / dc);
        }
        Some(Dim { terms }.normalized())
    }

    /// Addition that returns `None` instead of overflowing (dims built from
    /// user data, e.g. an `INT64_MAX` slice end, can be extreme).
    pub fn checked_add(&self, other: &Dim) -> Option<Dim> {
        let mut terms = self.terms.clone();
        for (m, c) in &other.terms {
            let t = terms.entry(m.clone()).or_insert(0);
            *t = t.checked_add(*c)?;
        }
        Some(Dim { terms }.normalized())
    }

    /// Negation that returns `None` instead of overflowing.
    pub fn checked_neg(&self) -> Option<Dim> {
        let terms = self.terms.iter().map(|(m, c)| Some((m.clone(), c.checked_neg()?))).collect::<Option<_>>()?;
        Some(Dim { terms })
    }

    /// Subtraction that returns `None` instead of overflowing.
    pub fn checked_sub(&self, other: &Dim) -> Option<Dim> {
        self.checked_add(&other.checked_neg()?)
    }

    /// Multiplication that returns `None` instead of overflowing.
    pub fn checked_mul(&self, other: &Dim) -> Option<Dim> {
        let mut terms: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let mut m: Monomial = ma.iter().chain(mb.iter()).cloned().collect();
                m.sort();
                let t = terms.entry(m).or_insert(0);
                *t = t.checked_add(ca.checked_mul(*cb)?)?;
            }
        }
        Some(Dim { terms }.normalized())
    }

    /// Exact division that also returns `None` where it would overflow (`i64::MIN / -1`).
    pub fn checked_div_exact(&self, other: &Dim) -> Option<Dim> {
        let divisor = match other.as_fixed() {
            Some(d) => d,
            None if other.terms.len() == 1 => *other.terms.values().next()?,
            None => 1,
        };
        if divisor == -1 && self.terms.values().any(|&c| c == i64::MIN) {
            return None;
        }
        self.div_exact(other)
    }

    /// The symbol's name when the dimension is exactly one symbol (`seq`, not `2*seq`).
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.iter().next() {
            Some((m, 1)) if self.terms.len() == 1 && m.len() == 1 => Some(m[0].as_str()),
            _ => None,
        }
    }

    /// Evaluates the dimension with concrete symbol values.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        let mut total = 0i64;
        for (m, c) in &self.terms {
            let mut p = *c;
            for s in m {
                p = p.checked_mul(bind(s)?)?;
            }
            total = total.checked_add(p)?;
        }
        Some(total)
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::fixed(v)
    }
}

impl fmt::Display for Dim {
    /// `seq+past`, `2*seq-1`, `batch*seq`, `64`: symbolic terms first, in name order,
    /// then the constant.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        let mut ordered: Vec<(&Monomial, &i64)> = self.terms.iter().filter(|(m, _)| !m.is_empty()).collect();
        ordered.extend(self.terms.iter().filter(|(m, _)| m.is_empty()));
        for (i, (m, &c)) in ordered.into_iter().enumerate() {
            let sign = if c < 0 {
                "-"
            } else if i > 0 {
                "+"
            } else {
                ""
            };
            let mag = c.unsigned_abs();
            write!(f, "{sign}")?;
            if m.is_empty() {
                write!(f, "{mag}")?;
            } else {
                if mag != 1 {
                    write!(f, "{mag}*")?;
                }
                write!(f, "{}", m.join("*"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_arithmetic() {
        let seq = Dim::sym("seq");
        let past = Dim::sym("past");
        let total = seq.checked_add(&past).unwrap();
        assert_eq!(total.to_string(), "past+seq");
        assert_eq!(past.checked_add(&seq).unwrap(), total);
        assert_eq!(total.checked_sub(&past).unwrap(), seq);
        let s64 = seq.checked_mul(&Dim::fixed(64)).unwrap();
        assert_eq!(s64.to_string(), "64*seq");
        assert_eq!(s64.checked_div_exact(&Dim::fixed(16)).unwrap().to_string(), "4*seq");
        assert_eq!(seq.checked_add(&Dim::fixed(1)).unwrap().checked_div_exact(&Dim::fixed(2)), None);
        assert_eq!(seq.checked_sub(&Dim::fixed(1)).unwrap().to_string(), "seq-1");
        let b_s = Dim::sym("batch").checked_mul(&seq).unwrap();
        assert_eq!(b_s.to_string(), "batch*seq");
        assert_eq!(b_s.checked_div_exact(&seq), Some(Dim::sym("batch")));
        assert_eq!(total.eval(&|s| Some(if s == "seq" { 3 } else { 4 })), Some(7));
        assert_eq!(Dim::fixed(5).as_fixed(), Some(5));
        assert_eq!(Dim::fixed(0).as_fixed(), Some(0));
        // Overflow is reported, never a panic.
        assert_eq!(Dim::fixed(i64::MAX).checked_add(&Dim::fixed(1)), None);
        assert_eq!(Dim::fixed(i64::MIN).checked_div_exact(&Dim::fixed(-1)), None);
    }
}
