//! A small subset of CEL, enough for the `x-kubernetes-validations` rules our
//! CRDs use, so invalid objects are rejected at write time as on a real cluster.
//!
//! Supported: `self` and field access, string/int/bool/null literals, `!`,
//! unary `-`, `&&`, `||`, `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `has(x.f)`,
//! `size(x)` / `x.size()`, `isCIDR(s)`, `isIP(s)`, and the `all` / `exists`
//! macros. A rule using anything else (including `oldSelf` transition rules)
//! fails to compile and is skipped; the server logs it at debug level.

use serde_json::Value;

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Lit(Value),
    /// A variable (`self`, or a macro's bound variable).
    Ident(String),
    /// `target.field`.
    Member(Box<Expr>, String),
    /// `has(target.field)`.
    Has(Box<Expr>, String),
    /// A function or method call.
    Call(String, Vec<Expr>),
    /// `range.all(var, predicate)` or `range.exists(var, predicate)`.
    Macro {
        all: bool,
        range: Box<Expr>,
        var: String,
        predicate: Box<Expr>,
    },
    /// `!e`.
    Not(Box<Expr>),
    /// `-e`.
    Neg(Box<Expr>),
    /// A binary operator.
    Binary(&'static str, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Int(i64),
    Str(String),
    Op(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    const OPS: [&str; 18] = [
        "||", "&&", "==", "!=", "<=", ">=", "<", ">", "!", "(", ")", ",", ".", "-", "[", "]", "+",
        "?",
    ];
    let mut tokens = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            tokens.push(Token::Int(
                text.parse().map_err(|_| format!("bad number {text}"))?,
            ));
        } else if c == '\'' || c == '"' {
            let mut text = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                text.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err("unterminated string".into());
            }
            i += 1;
            tokens.push(Token::Str(text));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPS
                .iter()
                .find(|op| rest.starts_with(**op))
                .ok_or_else(|| format!("unexpected {c:?}"))?;
            tokens.push(Token::Op(op));
            i += op.len();
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Token::Op(o)) if *o == op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(format!("expected {op:?} at token {}", self.pos))
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Binary("||", Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Expr::Binary("&&", Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Expr, String> {
        let left = self.unary()?;
        let op = match self.peek() {
            Some(Token::Op(op)) if matches!(*op, "==" | "!=" | "<" | "<=" | ">" | ">=") => *op,
            Some(Token::Ident(word)) if word == "in" => "in",
            _ => return Ok(left),
        };
        self.pos += 1;
        Ok(Expr::Binary(op, Box::new(left), Box::new(self.unary()?)))
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.or()?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    fn postfix(&mut self) -> Result<Expr, String> {
        let mut expr = self.primary()?;
        while self.eat(".") {
            let Some(Token::Ident(name)) = self.peek().cloned() else {
                return Err("expected a field or method name".into());
            };
            self.pos += 1;
            if self.eat("(") {
                let mut args = self.args()?;
                expr = match (name.as_str(), args.as_slice()) {
                    ("all" | "exists", [Expr::Ident(var), _]) => {
                        let var = var.clone();
                        let predicate = args.pop().ok_or("missing predicate")?;
                        Expr::Macro {
                            all: name == "all",
                            range: Box::new(expr),
                            var,
                            predicate: Box::new(predicate),
                        }
                    }
                    ("size", []) => Expr::Call("size".into(), vec![expr]),
                    _ => return Err(format!("unsupported method {name}")),
                };
            } else {
                expr = Expr::Member(Box::new(expr), name);
            }
        }
        Ok(expr)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("unexpected end")?;
        self.pos += 1;
        match token {
            Token::Int(n) => Ok(Expr::Lit(Value::from(n))),
            Token::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Token::Op("(") => {
                let inner = self.or()?;
                self.expect(")")?;
                Ok(inner)
            }
            Token::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                "oldSelf" => Err("transition rules (oldSelf) are not supported".into()),
                _ if self.eat("(") => {
                    let args = self.args()?;
                    match (name.as_str(), args.as_slice()) {
                        ("has", [Expr::Member(target, field)]) => {
                            Ok(Expr::Has(target.clone(), field.clone()))
                        }
                        ("size" | "isCIDR" | "isIP", [_]) => Ok(Expr::Call(name, args)),
                        _ => Err(format!("unsupported function {name}")),
                    }
                }
                _ => Ok(Expr::Ident(name)),
            },
            Token::Op(op) => Err(format!("unexpected {op:?}")),
        }
    }
}

/// Compiles a rule.
pub fn compile(rule: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        tokens: tokenize(rule)?,
        pos: 0,
    };
    let expr = parser.or()?;
    if parser.pos != parser.tokens.len() {
        return Err(format!("unexpected trailing input at token {}", parser.pos));
    }
    Ok(expr)
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

fn truthy(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("expected a bool, got {value}"))
}

/// Evaluates an expression with these variable bindings.
pub fn eval(expr: &Expr, vars: &[(&str, &Value)]) -> Result<Value, String> {
    Ok(match expr {
        Expr::Lit(v) => v.clone(),
        Expr::Ident(name) => vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| (*v).clone())
            .ok_or_else(|| format!("undeclared reference to {name}"))?,
        Expr::Member(target, field) => {
            let target = eval(target, vars)?;
            target
                .get(field)
                .cloned()
                .ok_or_else(|| format!("no such key: {field}"))?
        }
        Expr::Has(target, field) => Value::Bool(eval(target, vars)?.get(field).is_some()),
        Expr::Call(name, args) => {
            let arg = eval(&args[0], vars)?;
            match (name.as_str(), &arg) {
                ("size", Value::String(s)) => Value::from(s.chars().count()),
                ("size", Value::Array(a)) => Value::from(a.len()),
                ("size", Value::Object(m)) => Value::from(m.len()),
                ("isCIDR", Value::String(s)) => Value::Bool(is_cidr(s)),
                ("isIP", Value::String(s)) => Value::Bool(s.parse::<std::net::IpAddr>().is_ok()),
                _ => return Err(format!("no matching overload for {name}({arg})")),
            }
        }
        Expr::Macro {
            all,
            range,
            var,
            predicate,
        } => {
            let range = eval(range, vars)?;
            let items: Vec<Value> = match range {
                Value::Array(items) => items,
                Value::Object(map) => map.keys().map(|k| Value::String(k.clone())).collect(),
                other => return Err(format!("cannot iterate over {other}")),
            };
            let mut result = *all;
            for item in &items {
                let mut scoped = vars.to_vec();
                scoped.push((var.as_str(), item));
                if truthy(&eval(predicate, &scoped)?)? != *all {
                    result = !*all;
                    break;
                }
            }
            Value::Bool(result)
        }
        Expr::Not(e) => Value::Bool(!truthy(&eval(e, vars)?)?),
        Expr::Neg(e) => {
            let v = eval(e, vars)?;
            Value::from(-v.as_i64().ok_or_else(|| format!("cannot negate {v}"))?)
        }
        Expr::Binary(op, left, right) => {
            // `||` and `&&` short-circuit: the right side may be an error when the left decides.
            if *op == "||" || *op == "&&" {
                let l = truthy(&eval(left, vars)?)?;
                if (*op == "||" && l) || (*op == "&&" && !l) {
                    return Ok(Value::Bool(l));
                }
                return Ok(Value::Bool(truthy(&eval(right, vars)?)?));
            }
            let (l, r) = (eval(left, vars)?, eval(right, vars)?);
            let ordered = || -> Result<std::cmp::Ordering, String> {
                match (&l, &r) {
                    (Value::Number(a), Value::Number(b)) => a
                        .as_f64()
                        .zip(b.as_f64())
                        .and_then(|(a, b)| a.partial_cmp(&b))
                        .ok_or_else(|| "incomparable numbers".to_string()),
                    (Value::String(a), Value::String(b)) => Ok(a.cmp(b)),
                    _ => Err(format!("no matching overload for {l} {op} {r}")),
                }
            };
            Value::Bool(match *op {
                "==" => l == r,
                "!=" => l != r,
                "<" => ordered()?.is_lt(),
                "<=" => ordered()?.is_le(),
                ">" => ordered()?.is_gt(),
                ">=" => ordered()?.is_ge(),
                "in" => match &r {
                    Value::Array(items) => items.contains(&l),
                    Value::Object(map) => l.as_str().is_some_and(|k| map.contains_key(k)),
                    _ => return Err(format!("no matching overload for in {r}")),
                },
                _ => return Err(format!("unsupported operator {op}")),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(rule: &str, value: Value) -> bool {
        let expr = compile(rule).unwrap();
        truthy(&eval(&expr, &[("self", &value)]).unwrap()).unwrap()
    }

    #[test]
    fn the_rules_our_crds_use_evaluate_like_cel() {
        assert!(check(
            "self.all(c, isCIDR(c))",
            json!(["10.0.0.0/8", "fd00::/64"])
        ));
        assert!(!check(
            "self.all(c, isCIDR(c))",
            json!(["10.0.0.0/8", "10.0.0.1"])
        ));
        assert!(check(
            "self.all(a, a == 'primary' || isCIDR(a))",
            json!(["primary", "10.0.0.0/8"])
        ));
        assert!(!check(
            "self.all(a, a == 'primary' || isCIDR(a))",
            json!(["secondary"])
        ));
        let mode =
            "self.mode != 'ClusterCIDR' || (has(self.clusterCIDRs) && size(self.clusterCIDRs) > 0)";
        assert!(check(mode, json!({"mode": "NodeCIDR"})));
        assert!(check(
            mode,
            json!({"mode": "ClusterCIDR", "clusterCIDRs": ["10.0.0.0/8"]})
        ));
        assert!(!check(
            mode,
            json!({"mode": "ClusterCIDR", "clusterCIDRs": []})
        ));
        assert!(!check(mode, json!({"mode": "ClusterCIDR"})));
        let scoped = "!has(self.serviceSelector) || (!has(self.sync) && (!has(self.masquerade) || !has(self.masquerade.masqueradeBit)))";
        assert!(check(scoped, json!({"sync": {}})));
        assert!(check(
            scoped,
            json!({"serviceSelector": {}, "masquerade": {}})
        ));
        assert!(!check(
            scoped,
            json!({"serviceSelector": {}, "masquerade": {"masqueradeBit": 3}})
        ));
    }

    #[test]
    fn operators_and_macros() {
        assert!(check(
            "self.x in self.allowed",
            json!({"x": "a", "allowed": ["a", "b"]})
        ));
        assert!(!check(
            "self.x in self.allowed",
            json!({"x": "c", "allowed": ["a", "b"]})
        ));
        assert!(check(
            "self.exists(n, n > 2) && !self.all(n, n > 2)",
            json!([1, 3])
        ));
        assert!(check("self.size() == 2 && size('ab') == 2", json!([1, 2])));
        assert!(check("-1 < self.n && self.n <= 5", json!({"n": 5})));
        assert!(check("isIP(self.ip)", json!({"ip": "fd00::1"})));
    }

    #[test]
    fn unsupported_rules_do_not_compile() {
        assert!(compile("self.x == oldSelf.x").is_err());
        assert!(compile("self.matches('^a$')").is_err());
        assert!(compile("self.x ? 1 : 2").is_err());
    }
}
