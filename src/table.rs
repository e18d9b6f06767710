//! Plain-text tables and number formatting for the command line.

/// A table whose columns are padded to their widest cell; numeric-looking cells align right.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width = vec![0; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |row: &[String], out: &mut String| {
            let cells: Vec<String> = row
                .iter()
                .zip(&width)
                .map(|(cell, &w)| if numeric(cell) { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        };
        let mut out = String::new();
        line(&self.headers, &mut out);
        let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
        out.push_str(&rule.join("  "));
        out.push('\n');
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }
}

/// Whether a cell reads as a number (`1,234`, `8.21 G`, `-0.5`, `97.3%`): those align right.
fn numeric(cell: &str) -> bool {
    let cell = cell.replace(',', "");
    let cell = cell.trim_end_matches(['%', 'x']);
    let mut parts = cell.split(' ');
    let number = parts.next().is_some_and(|n| n.parse::<f64>().is_ok());
    let unit = parts.next().is_none_or(|u| u.len() <= 2 && u.chars().all(|c| c.is_ascii_alphabetic()));
    number && unit && parts.next().is_none()
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `8.2e9` → `8.21 G` (decimal SI prefixes).
pub fn si(x: f64) -> String {
    let units = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in units {
        if x.abs() >= scale {
            return format!("{:.2} {unit}", x / scale);
        }
    }
    format!("{x:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(25_557_032), "25,557,032");
        assert_eq!(thousands(999), "999");
        assert_eq!(si(8.21e9), "8.21 G");
        assert_eq!(si(512.0), "512");
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["name", "params"]);
        t.row(vec!["conv1".into(), "260".into()]);
        t.row(vec!["fc".into(), "96,300".into()]);
        assert_eq!(t.render(), "name   params\n-----  ------\nconv1     260\nfc     96,300\n");
    }
}
