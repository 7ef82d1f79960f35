//! The book (`book/src`) against the code: every chapter is listed and exists, every
//! `{{#include}}` names a file and an anchor that exist (mdBook only warns about a missing file
//! and silently shows nothing for a missing anchor), and every `medr1` command, example and
//! feature a reader is told to run exists with the flags the book gives it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::cli::medr1;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chapters() -> Vec<(PathBuf, String)> {
    let src = root().join("book/src");
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    out.sort();
    out
}

/// The targets of `](target.md)` links in `text`.
fn md_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|t| t.ends_with(".md"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_summary_lists_every_chapter_and_every_link_between_chapters_resolves() {
    let src = root().join("book/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let listed: BTreeSet<String> = md_links(&summary).into_iter().collect();
    assert!(listed.len() >= 10, "SUMMARY.md lists {listed:?}");
    for chapter in &listed {
        assert!(
            src.join(chapter).is_file(),
            "SUMMARY.md lists missing {chapter}"
        );
    }
    for (path, text) in chapters() {
        for link in md_links(&text) {
            let target = link.split('#').next().unwrap();
            assert!(
                path.parent().unwrap().join(target).is_file(),
                "{}: link to missing {link}",
                path.display()
            );
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name == "SUMMARY.md" || listed.contains(&name),
            "book/src/{name} is not in SUMMARY.md"
        );
    }
}

/// `(chapter, path, anchor)` of every `{{#include path[:anchor]}}`.
fn includes() -> Vec<(PathBuf, String, Option<String>)> {
    let mut out = Vec::new();
    for (chapter, text) in chapters() {
        for rest in text.split("{{#").skip(1) {
            let body = rest.split("}}").next().unwrap();
            let mut words = body.split_whitespace();
            let directive = words.next().unwrap_or("");
            assert!(
                matches!(directive, "include" | "rustdoc_include"),
                "{}: unknown mdBook directive {{{{#{body}}}}}",
                chapter.display()
            );
            let target = words.next().unwrap_or("");
            let (file, anchor) = match target.split_once(':') {
                Some((f, a)) => (f.to_string(), Some(a.to_string())),
                None => (target.to_string(), None),
            };
            out.push((chapter.clone(), file, anchor));
        }
    }
    out
}

#[test]
fn every_include_names_an_existing_file_and_a_non_empty_anchor() {
    let all = includes();
    assert!(all.len() >= 4, "{all:?}");
    for (chapter, file, anchor) in all {
        let path = chapter.parent().unwrap().join(&file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: include {file}: {e}", chapter.display()));
        let Some(anchor) = anchor else { continue };
        // A line range (`:10:20`) is not used: anchors survive edits, line numbers do not.
        assert!(
            !anchor.chars().next().unwrap_or('0').is_ascii_digit(),
            "{}: include {file}:{anchor} uses line numbers; use an ANCHOR",
            chapter.display()
        );
        let start = format!("ANCHOR: {anchor}");
        let end = format!("ANCHOR_END: {anchor}");
        let (Some(a), Some(b)) = (text.find(&start), text.find(&end)) else {
            panic!("{}: {file} has no anchor `{anchor}`", chapter.display());
        };
        let region = &text[a + start.len()..b];
        let code_lines = region
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty() && !l.contains("ANCHOR"))
            .count();
        assert!(
            code_lines >= 2,
            "{}: anchor `{anchor}` in {file} is (nearly) empty",
            chapter.display()
        );
    }
}

/// Shell lines of the book's code blocks, with `\` continuations joined and comments removed.
fn shell_lines() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for (chapter, text) in chapters() {
        let mut in_block = false;
        let mut shell = false;
        let mut pending = String::new();
        for line in text.lines() {
            if let Some(lang) = line.trim_start().strip_prefix("```") {
                in_block = !in_block;
                shell = in_block && matches!(lang.trim(), "" | "sh" | "bash" | "console");
                continue;
            }
            if !(in_block && shell) {
                continue;
            }
            let line = line.split(" #").next().unwrap().trim_end();
            match line.strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    let joined = std::mem::take(&mut pending);
                    if !joined.trim().is_empty() {
                        out.push((chapter.clone(), joined.trim().to_string()));
                    }
                }
            }
        }
    }
    out
}

/// The `medr1` arguments of a line that runs it (`medr1 ...` or `cargo run ... -- ...`).
fn medr1_args(line: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() == Some(&"medr1") {
        return Some(words[1..].iter().map(|w| w.to_string()).collect());
    }
    if words.starts_with(&["cargo", "run"]) && !words.contains(&"--example") {
        let at = words.iter().position(|w| *w == "--")?;
        return Some(words[at + 1..].iter().map(|w| w.to_string()).collect());
    }
    None
}

#[test]
fn every_command_the_book_gives_exists_with_its_flags() {
    let lines = shell_lines();
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let mut checked = 0;
    for (chapter, line) in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = |flag: &str| words.iter().position(|w| *w == flag).map(|i| words[i + 1]);
        if words.starts_with(&["cargo"]) {
            if let Some(example) = at("--example") {
                assert!(
                    root()
                        .join("examples")
                        .join(format!("{example}.rs"))
                        .is_file(),
                    "{}: `{line}`: no example {example}",
                    chapter.display()
                );
                checked += 1;
            }
            if let Some(bench) = at("--bench") {
                assert!(
                    root().join("benches").join(format!("{bench}.rs")).is_file(),
                    "{}: `{line}`: no bench {bench}",
                    chapter.display()
                );
                checked += 1;
            }
            if let Some(features) = at("--features") {
                for f in features.split(',') {
                    assert!(
                        manifest.contains(&format!("\n{f} = [")),
                        "{}: `{line}`: no feature {f}",
                        chapter.display()
                    );
                }
            }
        }
        let Some(args) = medr1_args(line) else {
            continue;
        };
        // Usage lines write options as `[--device flex|wgpu|cuda]` and repeats as `...`.
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.trim_matches(|c| c == '[' || c == ']' || c == '.')
                    .to_string()
            })
            .filter(|a| !a.is_empty())
            .collect();
        let subcommand: Vec<&str> = args
            .iter()
            .take_while(|a| !a.starts_with('-'))
            .map(String::as_str)
            .take(2)
            .collect();
        assert!(
            !subcommand.is_empty(),
            "{}: `{line}` names no subcommand",
            chapter.display()
        );
        // `data summary DIR`: the second word is a subcommand only when `data` has one.
        let (ok, help, err) = medr1(&[&subcommand[..], &["--help"][..]].concat());
        let (ok, help) = if ok {
            (ok, help)
        } else {
            let (ok1, help1, err1) = medr1(&[subcommand[0], "--help"]);
            assert!(ok1, "{}: `{line}`: {err} {err1}", chapter.display());
            (ok1, help1)
        };
        assert!(ok);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{}: `{line}`: `medr1 {}` has no {flag}",
                chapter.display(),
                subcommand.join(" ")
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} commands found in the book");
}

#[test]
fn the_readme_commands_are_the_books() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let quickstart = std::fs::read_to_string(root().join("book/src/quickstart.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    // The CPU suite (nothing but the Rust toolchain) and the suite with the WGPU checks,
    // which CI runs.
    let cpu = "cargo test --workspace\n";
    let with_wgpu = "cargo test --workspace --features wgpu";
    for (name, text) in [("README.md", &readme), ("quickstart.md", &quickstart)] {
        assert!(
            text.contains(cpu) || text.contains("cargo test --workspace  "),
            "{name} lacks `{cpu}`"
        );
        assert!(text.contains(with_wgpu), "{name} lacks `{with_wgpu}`");
    }
    assert!(ci.contains(with_wgpu), ".ci/run lacks `{with_wgpu}`");
    assert!(readme.contains("cargo run --release"));
}
