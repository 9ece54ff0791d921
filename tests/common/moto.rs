//! A real S3-compatible server for the tests: moto's server mode
//! (`moto_server`, installed by scripts/install-test-deps), one process per
//! test on an OS-chosen port, killed on drop. A missing moto_server is a
//! test failure, never a skip.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::Server;

pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run moto_server ({e}); install the test tools with scripts/install-test-deps")
            });
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        // Werkzeug names the port it was given: `* Running on http://127.0.0.1:PORT`.
        let endpoint = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(i) = line.find("Running on http://") {
                        break line[i + "Running on ".len()..].trim().to_string();
                    }
                    seen.push(line);
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("moto_server exited before listening:\n{}", seen.join("\n"));
                }
            }
        };
        // Keep draining stderr (one line per request) so moto never blocks.
        std::thread::spawn(move || for _ in lines {});
        Moto { child, endpoint }
    }

    /// The standard variables `niso` reads an S3 store's settings from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Creates `bucket`; with `public`, the bucket policy of the README's
    /// S3 section lets anyone read (only read) the root repository's files
    /// under that prefix, but not organization repositories (`repos/`).
    /// It works on AWS once the bucket's Block Public Access settings allow
    /// it; a `public-read` ACL would not do there (it opens the listing, not
    /// the objects). Plain unsigned requests: moto checks no credentials
    /// unless told to, and python3 with boto3 takes seconds to start.
    pub fn create_bucket(&self, bucket: &str, public: Option<&str>) {
        let c = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client");
        let url = format!("{}/{bucket}", self.endpoint);
        let r = c.put(&url).send().expect("create a bucket on moto");
        assert!(r.status().is_success(), "creating bucket {bucket}: {r:?}");
        if let Some(prefix) = public {
            let base = match prefix {
                "" => format!("arn:aws:s3:::{bucket}"),
                p => format!("arn:aws:s3:::{bucket}/{p}"),
            };
            let resources: Vec<String> = [
                "names",
                "versions",
                "public_key",
                "publisher-keys",
                "freshness",
                "freshness-bins/*",
                "packages/*",
                "niso/*",
                "tarballs/*",
                "archives/*",
                "v1/*",
            ]
            .iter()
            .map(|r| format!("{base}/{r}"))
            .collect();
            let policy = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": "*",
                               "Action": "s3:GetObject", "Resource": resources}],
            });
            let r = c
                .put(format!("{url}?policy"))
                .header("content-type", "application/json")
                .body(policy.to_string())
                .send()
                .expect("set a bucket policy on moto");
            assert!(r.status().is_success(), "policy of {bucket}: {r:?}");
        }
    }

    /// `niso ARGS` with this server's settings in the environment.
    pub fn niso(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_niso"))
            .args(args)
            .envs(self.env())
            .env_remove("NISO_LOG")
            .env_remove("RUST_LOG")
            .output()
            .expect("run niso")
    }

    /// [`Moto::niso`], asserting success; stdout and stderr as text.
    pub fn niso_ok(&self, args: &[&str]) -> String {
        let out = self.niso(args);
        let text = super::text(&out);
        assert_eq!(out.status.code(), Some(0), "niso {args:?} failed:\n{text}");
        text
    }

    /// `niso registry serve` on `data_dir` with this server's settings.
    pub fn serve(&self, data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra, self.env())
    }

    /// The store `s3://BUCKET/PREFIX` on this server, opened in this process
    /// (the environment variables are the process's, shared by every test
    /// thread, so the settings are given directly).
    pub fn store(&self, bucket: &str, prefix: &str) -> std::sync::Arc<dyn niso::store::Store> {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_bucket_name(bucket)
            .build()
            .expect("an S3 client for moto");
        std::sync::Arc::new(niso::store::ObjectBackend::new(
            std::sync::Arc::new(s3),
            prefix,
            format!("s3://{bucket}/{prefix}"),
        ))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
