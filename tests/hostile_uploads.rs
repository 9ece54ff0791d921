//! Security issue 16 end to end: hostile archives sent to a real
//! `niso registry serve` (over TCP on 127.0.0.1) and given to
//! `niso registry publish`. Each must get one precise 4xx (or a precise
//! error and exit status 2), leave the tree and the staging area exactly as
//! they were, and keep the server's memory bounded.
//!
//! The archives are built here byte by byte (raw tar headers, gzip), as an
//! attacker would; `tests/archive_rules.rs` covers the same rules against
//! the library, case by case.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use flate2::write::GzEncoder;
use flate2::Compression;
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .unwrap()
}

fn upload(s: &Server, path: &str, body: Vec<u8>) -> Response {
    client()
        .post(s.url(path))
        .bearer_auth(&s.admin)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap()
}

/// Asserts the status and the JSON error envelope, and that the whole body
/// is short; returns the message.
#[track_caller]
fn short_error(r: Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status);
    let body = r.bytes().unwrap();
    assert!(
        body.len() < 1024,
        "error body of {} bytes: {:.300}",
        body.len(),
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], status.as_u16(), "{v}");
    v["error"].as_str().expect("error message").to_string()
}

// ---------------------------------------------------------------------------
// Raw tar and gzip.

/// A raw 512-byte tar header: GNU format, any name bytes, any type and size.
fn header(name: &[u8], kind: tar::EntryType, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8]) {
    out.extend_from_slice(&header(name.as_bytes(), kind, data.len() as u64));
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    entry(out, name, tar::EntryType::Regular, data);
}

fn symlink(out: &mut Vec<u8>, name: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_link_name(target).unwrap();
    h.set_size(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 1024]);
}

/// A pax extended header holding one `size` record.
fn pax_size(out: &mut Vec<u8>, size: u64) {
    let body = format!(" size={size}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    entry(
        out,
        "././@PaxHeader",
        tar::EntryType::XHeader,
        format!("{len}{body}").as_bytes(),
    );
}

fn gz(data: &[u8]) -> Vec<u8> {
    gz_level(data, Compression::default())
}

fn gz_level(data: &[u8], level: Compression) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), level);
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// gzip of `head` then `zeros` zero bytes, never holding the zeros. (Fast
/// compression keeps the tests quick; at gzip's best, 256 MiB of zeros
/// is the 261 KB.)
fn gz_zeros(head: &[u8], zeros: u64) -> Vec<u8> {
    gz_zeros_then(head, zeros, &[])
}

/// The same with `tail` after the zeros.
fn gz_zeros_then(head: &[u8], zeros: u64, tail: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(head).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    enc.write_all(tail).unwrap();
    enc.finish().unwrap()
}

// ---------------------------------------------------------------------------
// Packages.

fn manifest(name: &str, arch: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"1.0.0\"\narch = \"{arch}\"\n\n\
         [binary]\nentrypoint = \"bin/app\"\n"
    )
}

/// The entries of a valid `.niso` (no end blocks).
fn niso_body(name: &str, arch: &str) -> Vec<u8> {
    let mut t = Vec::new();
    file(&mut t, "niso.toml", manifest(name, arch).as_bytes());
    entry(&mut t, "payload/", tar::EntryType::Directory, b"");
    file(&mut t, "payload/bin/app", b"#!/bin/sh\necho hi\n");
    t
}

fn niso_archive(name: &str, arch: &str) -> Vec<u8> {
    let mut t = niso_body(name, arch);
    end(&mut t);
    gz(&t)
}

fn hex_metadata(name: &str, description: &str) -> Vec<u8> {
    format!(
        "{{<<\"name\">>,<<\"{name}\">>}}.\n{{<<\"version\">>,<<\"1.0.0\">>}}.\n\
         {{<<\"description\">>,<<\"{description}\">>}}.\n{{<<\"app\">>,<<\"{name}\">>}}.\n\
         {{<<\"build_tools\">>,[<<\"rebar3\">>]}}.\n{{<<\"requirements\">>,[]}}.\n"
    )
    .into_bytes()
}

/// The entries of a valid contents tar (no end blocks).
fn contents_body() -> Vec<u8> {
    let mut t = Vec::new();
    file(&mut t, "src/x.erl", b"-module(x).\n");
    t
}

/// A Hex tarball (format 3) of `metadata` and `contents` (gzip), with the
/// right CHECKSUM; `after_end` is appended after the outer end blocks.
fn hex(metadata: &[u8], contents: &[u8], after_end: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"3");
    h.update(metadata);
    h.update(contents);
    let checksum = hex::encode_upper(h.finalize());
    let mut t = Vec::new();
    file(&mut t, "VERSION", b"3");
    file(&mut t, "CHECKSUM", checksum.as_bytes());
    file(&mut t, "metadata.config", metadata);
    file(&mut t, "contents.tar.gz", contents);
    end(&mut t);
    t.extend_from_slice(after_end);
    t
}

fn valid_contents() -> Vec<u8> {
    let mut t = contents_body();
    end(&mut t);
    gz(&t)
}

/// The memory bomb: `prefix`, a pax header with `size=0`, a GNU
/// long name of 256 MiB of NULs, and the file it names (gzipped to about
/// 260 KB at gzip's best).
fn bomb(prefix: &[u8]) -> Vec<u8> {
    let mut head = prefix.to_vec();
    pax_size(&mut head, 0);
    head.extend_from_slice(&header(
        b"././@LongLink",
        tar::EntryType::GNULongName,
        256 * MIB,
    ));
    let mut tail = Vec::new();
    file(&mut tail, "payload/x", b"x");
    end(&mut tail);
    gz_zeros_then(&head, 256 * MIB, &tail)
}

/// The server's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(s: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

/// What a refused upload must leave: the tree as it was, nothing staged.
#[track_caller]
fn assert_unchanged(s: &Server, before: &std::collections::BTreeMap<String, Vec<u8>>) {
    assert!(
        *before == snapshot(&s.tree()),
        "a refused upload changed the tree"
    );
    let staged: Vec<_> = std::fs::read_dir(s.data_dir.join("staging"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "{staged:?}");
}

/// `niso registry publish` of `archive` (written to `name`) into a fresh
/// data directory under `dir`: it must fail with exit status 2, say
/// `expect`, print little, and change nothing. Returns the message.
#[track_caller]
fn publish_refused(dir: &Path, name: &str, archive: &[u8], flags: &[&str], expect: &str) -> String {
    let dd = dir.join(format!("data-{name}"));
    niso_ok(&["registry", "init", "--data-dir", p(&dd), "--name", "acme"]);
    let path = dir.join(name);
    std::fs::write(&path, archive).unwrap();
    let before = snapshot(&dd);
    let mut args = vec!["registry", "publish", "--data-dir", p(&dd)];
    args.extend_from_slice(flags);
    args.push(p(&path));
    let out = niso(&args);
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text:.500}");
    assert!(text.contains(expect), "{text:.500}");
    assert!(text.len() < 1024, "{} bytes: {text:.300}", text.len());
    assert!(before == snapshot(&dd), "a refused publish changed {name}");
    text
}

// ---------------------------------------------------------------------------
// Item 2: the memory bomb.

#[test]
fn memory_bomb_gets_a_short_400_and_memory_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let before = snapshot(&s.tree());
    let idle = peak_rss(&s);

    let mut niso_head = Vec::new();
    file(
        &mut niso_head,
        "niso.toml",
        manifest("bomb", "x86_64").as_bytes(),
    );
    let niso_bomb = bomb(&niso_head);
    assert!(niso_bomb.len() < 2_000_000, "{} bytes", niso_bomb.len());
    let hex_bomb = hex(&hex_metadata("bomb", "a bomb"), &bomb(&[]), &[]);

    // Both uploads first, then the peak, then the checks: a run against a
    // server without the fix still reports what it did.
    let answers: Vec<(StatusCode, Vec<u8>)> = [
        ("/v1/packages/bomb/1.0.0/x86_64", niso_bomb.clone()),
        ("/v1/packages/bomb/1.0.0/any", hex_bomb.clone()),
    ]
    .into_iter()
    .map(|(path, body)| {
        let r = upload(&s, path, body);
        (r.status(), r.bytes().unwrap().to_vec())
    })
    .collect();
    // Before the fix the server's peak went from ~11 MiB to 1.8 GiB.
    let peak = peak_rss(&s);
    eprintln!(
        "server VmHWM: {} KiB idle, {} KiB after both bombs; error bodies of {} and {} bytes",
        idle / 1024,
        peak / 1024,
        answers[0].1.len(),
        answers[1].1.len(),
    );
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::BAD_REQUEST);
        assert!(body.len() < 1024, "error body of {} bytes", body.len());
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            v["error"],
            "invalid archive: a tar long-name or pax header is larger than the limit of 65536 bytes"
        );
    }
    assert!(peak < 100 * MIB, "server peak memory {} MiB", peak / MIB);
    assert_unchanged(&s, &before);
    s.assert_tree_verifies();

    publish_refused(
        tmp.path(),
        "bomb.niso",
        &niso_bomb,
        &[],
        "long-name or pax header",
    );
    publish_refused(
        tmp.path(),
        "bomb.tar",
        &hex_bomb,
        &[],
        "long-name or pax header",
    );
}

// ---------------------------------------------------------------------------
// Item 3: entries hidden after the end-of-archive marker.

#[test]
fn entries_after_the_end_of_archive_marker_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let before = snapshot(&s.tree());
    let mut hidden = Vec::new();
    file(&mut hidden, "../../../tmp/pwned", b"owned\n");
    symlink(&mut hidden, "payload/shadow", "/etc/shadow");
    end(&mut hidden);

    let niso_hidden = {
        let mut t = niso_body("my-app", "x86_64");
        end(&mut t);
        t.extend_from_slice(&hidden);
        gz(&t)
    };
    let outer_hidden = hex(&hex_metadata("my_pkg", "ok"), &valid_contents(), &hidden);
    let contents_hidden = {
        let mut t = contents_body();
        end(&mut t);
        t.extend_from_slice(&hidden);
        hex(&hex_metadata("my_pkg", "ok"), &gz(&t), &[])
    };
    for (path, body, file) in [
        ("/v1/packages/my-app/1.0.0/x86_64", &niso_hidden, "archive"),
        ("/v1/packages/my_pkg/1.0.0/any", &outer_hidden, "tarball"),
        (
            "/v1/packages/my_pkg/1.0.0/any",
            &contents_hidden,
            "contents.tar.gz",
        ),
    ] {
        let message = short_error(upload(&s, path, body.clone()), StatusCode::BAD_REQUEST);
        assert_eq!(
            message,
            format!(
                "invalid archive: {file}: data after the tar end-of-archive marker (tar -i would unpack it as more entries)"
            )
        );
    }
    assert_unchanged(&s, &before);
    for (name, body) in [
        ("hidden.niso", &niso_hidden),
        ("outer.tar", &outer_hidden),
        ("contents.tar", &contents_hidden),
    ] {
        publish_refused(tmp.path(), name, body, &[], "end-of-archive marker");
    }
    // Without the hidden part, the same archives are fine.
    let r = upload(
        &s,
        "/v1/packages/my-app/1.0.0/x86_64",
        niso_archive("my-app", "x86_64"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    s.assert_tree_verifies();
}

// ---------------------------------------------------------------------------
// Item 4: Hex's limits and descriptions.

/// A Hex tarball whose contents.tar.gz holds one file of `zeros` zeros.
fn hex_zeros(name: &str, zeros: u64) -> Vec<u8> {
    let head = header(b"priv/zeros.bin", tar::EntryType::Regular, zeros);
    let contents = gz_zeros(&head, zeros.div_ceil(512) * 512 + 1024);
    hex(&hex_metadata(name, "zeros"), &contents, &[])
}

#[test]
fn hex_tarballs_get_hex_limits_which_flags_change() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let before = snapshot(&s.tree());

    // The tarball: 600 MiB of zeros (600 KB at gzip's best).
    let bomb = hex_zeros("zeros", 600 * MIB);
    assert!(bomb.len() < 4_000_000, "{} bytes", bomb.len());
    let message = short_error(
        upload(&s, "/v1/packages/zeros/1.0.0/any", bomb.clone()),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        "invalid archive: archive unpacks to more than the limit of 134217728 bytes"
    );
    // A Hex tarball over 16 MiB is too large (413); a .niso of that size
    // is not.
    // Incompressible bytes (xorshift64*).
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..17 * MIB as usize)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect();
    let big_contents = {
        let mut t = Vec::new();
        file(&mut t, "priv/noise.bin", &noise);
        end(&mut t);
        gz_level(&t, Compression::none())
    };
    assert!(big_contents.len() as u64 > 16 * MIB);
    let big_hex = hex(&hex_metadata("noise", "noise"), &big_contents, &[]);
    let message = short_error(
        upload(&s, "/v1/packages/noise/1.0.0/any", big_hex.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    assert_eq!(
        message,
        "invalid archive: archive is larger than the limit of 16777216 bytes"
    );
    // A description of 1 MB with NUL and escape codes.
    let description = format!("{}\\0\\e[2J", "d".repeat(1_000_000));
    let message = short_error(
        upload(
            &s,
            "/v1/packages/long_desc/1.0.0/any",
            hex(
                &hex_metadata("long_desc", &description),
                &valid_contents(),
                &[],
            ),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        message.contains("metadata.config: description is longer than 512 bytes"),
        "{message}"
    );
    let message = short_error(
        upload(
            &s,
            "/v1/packages/ctl_desc/1.0.0/any",
            hex(
                &hex_metadata("ctl_desc", "red \\e[31m"),
                &valid_contents(),
                &[],
            ),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert!(message.contains("control characters"), "{message}");
    assert_unchanged(&s, &before);
    let r = upload(&s, "/v1/packages/noise/1.0.0/x86_64", {
        let mut t = niso_body("noise", "x86_64");
        file(&mut t, "payload/noise.bin", &noise);
        end(&mut t);
        gz_level(&t, Compression::none())
    });
    assert_eq!(r.status(), StatusCode::CREATED);
    s.assert_tree_verifies();
    drop(s);

    // Raised by flags, the same Hex tarballs are accepted.
    let s = Server::start(
        &tmp.path().join("raised"),
        &[
            "--max-hex-tarball",
            "33554432",
            "--max-hex-unpacked",
            "140000000",
        ],
    );
    let over = hex_zeros("zeros", 130 * MIB);
    for (path, body) in [
        ("/v1/packages/noise/1.0.0/any", big_hex.clone()),
        ("/v1/packages/zeros/1.0.0/any", over.clone()),
    ] {
        let r = upload(&s, path, body);
        assert_eq!(r.status(), StatusCode::CREATED, "{path}");
    }
    // verify checks archives with Hex's limits too: by default it reports
    // these two (no Hex client would unpack them); with the server's flags
    // it does not.
    let key = s.tree().join("public_key");
    let verify = |flags: &[&str]| {
        let mut args = vec![
            "registry",
            "verify",
            p(&s.data_dir),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ];
        args.extend_from_slice(flags);
        niso(&args)
    };
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("2 problems"), "{}", text(&out));
    let out = verify(&[
        "--max-hex-tarball",
        "33554432",
        "--max-hex-unpacked",
        "140000000",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(s);

    // And lowered for the offline commands.
    publish_refused(tmp.path(), "zeros.tar", &bomb, &[], "134217728 bytes");
    let small = hex(&hex_metadata("small", "ok"), &valid_contents(), &[]);
    publish_refused(
        tmp.path(),
        "small.tar",
        &small,
        &["--max-hex-tarball", "1000"],
        "archive is larger than the limit of 1000 bytes",
    );
    publish_refused(
        tmp.path(),
        "small2.tar",
        &small,
        &["--max-hex-unpacked", "1000"],
        "archive unpacks to more than the limit of 1000 bytes",
    );
    // build and verify read archives with the same flags.
    let dd = init(&tmp.path().join("built"), "acme");
    let path = tmp.path().join("small.tar");
    niso_ok(&["registry", "publish", "--data-dir", p(&dd), p(&path)]);
    let out = niso(&[
        "registry",
        "build",
        "--data-dir",
        p(&dd),
        "--max-hex-tarball",
        "1000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("limit of 1000 bytes"), "{}", text(&out));
    let key = dd.join("public/public_key");
    let verify = |flags: &[&str]| {
        let mut args = vec![
            "registry",
            "verify",
            p(&dd),
            "--public-key",
            p(&key),
            "--name",
            "acme",
        ];
        args.extend_from_slice(flags);
        niso(&args)
    };
    assert_eq!(verify(&[]).status.code(), Some(0));
    let out = verify(&["--max-hex-tarball", "1000"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("limit of 1000 bytes"), "{}", text(&out));
}

// ---------------------------------------------------------------------------
// Item 5: Windows device names.

#[test]
fn windows_device_names_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    let r = upload(
        &s,
        "/v1/packages/my-app/1.0.0/x86_64",
        niso_archive("my-app", "x86_64"),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let before = snapshot(&s.tree());

    for (path, body, status, what) in [
        (
            "/v1/packages/con/1.0.0/x86_64",
            niso_archive("con", "x86_64"),
            StatusCode::BAD_REQUEST,
            "invalid package name \"con\"",
        ),
        (
            "/v1/packages/my-app/1.0.0/com1",
            niso_archive("my-app", "com1"),
            StatusCode::BAD_REQUEST,
            "invalid arch \"com1\"",
        ),
        (
            "/repos/aux/v1/packages/my-app/1.0.0/x86_64",
            niso_archive("my-app", "x86_64"),
            // A bad name in a write is a 400, as for packages.
            StatusCode::BAD_REQUEST,
            "invalid repository name \"aux\"",
        ),
        (
            "/v1/packages/lpt9/1.0.0/any",
            hex(&hex_metadata("lpt9", "ok"), &valid_contents(), &[]),
            StatusCode::BAD_REQUEST,
            "invalid package name \"lpt9\"",
        ),
    ] {
        let message = short_error(upload(&s, path, body), status);
        assert!(
            message.contains(what) && message.contains("reserved device name on Windows"),
            "{path}: {message}"
        );
    }
    let r = client()
        .post(s.url("/v1/packages/my-app/tags"))
        .bearer_auth(&s.admin)
        .json(&serde_json::json!({"tag": "nul", "version": "1.0.0"}))
        .send()
        .unwrap();
    let message = short_error(r, StatusCode::BAD_REQUEST);
    assert!(
        message.contains("invalid tag \"nul\"") && message.contains("Windows"),
        "{message}"
    );
    assert_unchanged(&s, &before);
    s.assert_tree_verifies();

    // Offline: publish, package and init refuse them too.
    publish_refused(
        tmp.path(),
        "con.niso",
        &niso_archive("con", "x86_64"),
        &[],
        "reserved device name on Windows",
    );
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("payload/bin")).unwrap();
    std::fs::write(src.join("niso.toml"), manifest("prn", "x86_64")).unwrap();
    std::fs::write(src.join("payload/bin/app"), "#!/bin/sh\n").unwrap();
    let out = niso(&["package", p(&src), "--out", p(tmp.path())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("reserved device name on Windows"),
        "{}",
        text(&out)
    );
    let out = niso(&[
        "registry",
        "init",
        "--data-dir",
        p(&tmp.path().join("nul-data")),
        "--name",
        "nul",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("Windows"), "{}", text(&out));
    assert!(!tmp.path().join("nul-data").exists());
}
