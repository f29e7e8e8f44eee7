//! `flotilla migrate` end to end: the real binary on realistic docker+machine configs
//! (`tests/migrate/*.toml`, written from gitlab-runner's configuration docs), then
//! `flotilla check-config` on the flotilla.toml it wrote, then the conversions and report
//! lines each config is about. No runner token ever reaches the report or the terminal.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_proto::config::{Config, Market};
use flotilla_proto::duration::HumanDuration;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/migrate")
        .join(name)
}

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("runs the flotilla binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A finished migration: its output directory and what the command printed.
struct Migrated {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    stdout: String,
    stderr: String,
}

impl Migrated {
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", self.dir.join(name).display()))
    }

    fn report(&self) -> String {
        self.file("migration-report.txt")
    }

    /// The flotilla.toml as the daemon loads it.
    fn config(&self) -> Config {
        Config::load(&self.dir.join("flotilla.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn runner_config(&self) -> toml::Table {
        toml::from_str(&self.file("config.toml")).expect("config.toml is TOML")
    }

    /// The report line that starts with `prefix` and contains `needle`.
    fn line(&self, prefix: &str, needle: &str) -> String {
        let report = self.report();
        report
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(needle))
            .unwrap_or_else(|| panic!("no {prefix:?} line with {needle:?} in:\n{report}"))
            .to_owned()
    }

    /// No secret of the input in what was printed or in the report.
    fn assert_secrets_hidden(&self, secrets: &[&str]) {
        let report = self.report();
        for s in secrets {
            for (what, t) in [
                ("stdout", &self.stdout),
                ("stderr", &self.stderr),
                ("report", &report),
            ] {
                assert!(!t.contains(s), "{what} shows the secret {s}:\n{t}");
            }
        }
    }
}

/// Runs `flotilla migrate --from <fixture> --out-dir <tmp>/out <extra>`, expecting success,
/// then `flotilla check-config` on the flotilla.toml it wrote.
fn migrate(name: &str, extra: &[&str]) -> Migrated {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let from = fixture(name);
    let mut args = vec![
        "migrate",
        "--from",
        from.to_str().unwrap(),
        "--out-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = flotilla(&args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "migrate {name}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("wrote "), "{stdout}");
    assert!(
        stderr.contains("flotilla migrate: ") && stderr.contains("converted: "),
        "the report is printed on stderr:\n{stderr}"
    );
    let flotilla_toml = dir.join("flotilla.toml");
    let check = flotilla(&["--config", flotilla_toml.to_str().unwrap(), "check-config"]);
    assert!(
        check.status.success(),
        "check-config on the migrated {name}:\n{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    assert!(text(&check.stdout).starts_with("config OK: fleet "));
    let mode = std::fs::metadata(dir.join("config.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "config.toml holds runner tokens");
    Migrated {
        _tmp: tmp,
        dir,
        stdout,
        stderr,
    }
}

fn runners(t: &toml::Table) -> &Vec<toml::Value> {
    t["runners"].as_array().expect("[[runners]]")
}

fn strings(v: &toml::Value) -> Vec<&str> {
    v.as_array()
        .expect("an array")
        .iter()
        .filter_map(toml::Value::as_str)
        .collect()
}

#[test]
fn a_single_spot_runner_becomes_a_spot_class_behind_a_custom_runner() {
    let m = migrate("single-spot.toml", &[]);
    let c = m.config();
    assert_eq!(c.fleet, "aws-spot");
    assert_eq!(c.aws.region.as_deref(), Some("eu-central-1"));
    let class = &c.classes["aws-spot"];
    assert_eq!(class.market, Market::Spot);
    assert_eq!(class.instance_types, ["m5.large"]);
    assert_eq!(class.ami, "ami-0c0d3776ef525d5dd");
    assert_eq!(class.subnets, ["subnet-0a1b2c3d4e5f60718"]);
    assert_eq!(class.root_volume_gb, Some(40));
    assert_eq!(
        class.tags.get("runner-manager-name").map(String::as_str),
        Some("gitlab-aws-autoscaler"),
        "amazonec2-tags"
    );
    assert_eq!(class.tags.len(), 3);
    assert_eq!((class.idle_count, class.max_builds), (2, 10));
    assert_eq!(class.idle_time, HumanDuration::from_secs(1800));
    assert_eq!(class.max_machines, 20, "the runner's limit");
    assert!(!class.forecast.enabled, "docker+machine's idle semantics");
    assert_eq!(c.max_growth_rate, 3);
    assert_eq!(c.job.default_image, "alpine:3.20");
    assert!(
        c.job.volumes.is_empty(),
        "/cache is Flotilla's own cache volume"
    );

    let rc = m.runner_config();
    assert_eq!(rc["concurrent"].as_integer(), Some(10));
    let r = runners(&rc)[0].as_table().unwrap();
    assert_eq!(r["executor"].as_str(), Some("custom"));
    assert_eq!(r["token"].as_str(), Some("glrt-SPOTSECRETTOKEN0001"));
    assert_eq!(r["limit"].as_integer(), Some(20));
    assert!(r.get("docker").is_none() && r.get("machine").is_none());
    let custom = r["custom"].as_table().unwrap();
    assert_eq!(
        custom["prepare_exec"].as_str(),
        Some("/usr/local/bin/flotilla")
    );
    assert_eq!(
        strings(&custom["prepare_args"]),
        ["--config", "/etc/flotilla/flotilla.toml", "prepare"]
    );
    assert_eq!(
        strings(&custom["run_args"]),
        ["--config", "/etc/flotilla/flotilla.toml", "run"]
    );
    assert_eq!(custom["prepare_exec_timeout"].as_integer(), Some(1200));

    m.line(
        "converted: ",
        "amazonec2-request-spot-instance=true: classes.aws-spot.market = \"spot\"",
    );
    m.line(
        "no equivalent: ",
        "amazonec2-spot-price=0.05: Flotilla sets no maximum spot price",
    );
    m.line("converted: ", "classes.aws-spot.tags (3 tags)");
    m.line("action required: ", "amazonec2-security-group=docker-machine-runners: classes.aws-spot.security_groups: docker-machine takes group names");
    m.line("action required: ", "amazonec2-ami=ami-0c0d3776ef525d5dd");
    m.line("converted: ", "docker.volumes[0] \"/cache\": left out");
    m.line(
        "kept: ",
        "at their defaults, nothing to convert: tls_verify = false",
    );
    m.line("default: state_dir: ", "\"/var/lib/flotilla\"");
    m.assert_secrets_hidden(&["glrt-SPOTSECRETTOKEN0001"]);
}

#[test]
fn autoscaling_periods_become_schedules_with_every_idle_setting() {
    let m = migrate("autoscaling-periods.toml", &["--fleet", "ci-prod"]);
    let c = m.config();
    assert_eq!(c.fleet, "ci-prod");
    let class = &c.classes["autoscale-runner-on-demand"];
    assert_eq!(class.market, Market::OnDemand);
    assert_eq!(class.schedules.len(), 2);
    let work = &class.schedules[0];
    assert_eq!(work.periods, ["* 9-17 * * mon-fri"]);
    assert_eq!(work.timezone, "Europe/Berlin");
    assert_eq!(work.idle_count, Some(50));
    assert_eq!(work.idle_count_min, Some(5));
    assert_eq!(work.idle_scale_factor, Some(1.5));
    assert_eq!(work.idle_time, Some(HumanDuration::from_secs(3600)));
    let weekend = &class.schedules[1];
    assert_eq!(weekend.periods, ["* * * * sat,sun"]);
    assert_eq!(
        weekend.idle_time,
        Some(HumanDuration::from_secs(0)),
        "left out of the period: 0 in docker+machine, not the class's IdleTime"
    );
    assert_eq!(
        class.max_machines, 100,
        "limit 0: concurrent 50 + IdleCount 50"
    );
    let job = c.job_for("autoscale-runner-on-demand").unwrap();
    assert!(job.privileged && job.services_privileged == Some(true));
    assert_eq!(job.allowed_privileged_services, ["docker:*-dind"]);
    assert_eq!(job.pull_policy.len(), 2);
    assert_eq!(job.service_wait.0.as_secs(), 60);
    assert_eq!(job.container.shm_size.unwrap().0, 256 << 20);
    assert_eq!(job.container.cap_add, ["NET_ADMIN"]);
    assert!(job.container.ulimits.contains_key("nofile"));

    let r = runners(&m.runner_config())[0].as_table().unwrap().clone();
    assert_eq!(
        strings(&r["environment"]),
        ["DOCKER_DRIVER=overlay2", "LC_ALL=C.UTF-8"],
        "one class: no FLOTILLA_CLASS needed"
    );
    assert_eq!(r["request_concurrency"].as_integer(), Some(4));
    m.line(
        "converted: ",
        "machine.autoscaling[0]: [[classes.autoscale-runner-on-demand.schedules]] periods = [\"* 9-17 * * mon-fri\"], timezone = \"Europe/Berlin\"",
    );
    m.line(
        "default: ",
        "limit: no limit: docker+machine could run concurrent (50) jobs plus IdleCount (50)",
    );
    m.line("converted: ", "docker.ulimit: [job] container.ulimits");
    m.assert_secrets_hidden(&["glrt-PERIODSSECRET0002"]);
}

#[test]
fn three_runners_differing_by_instance_type_become_classes_of_one_fleet() {
    let m = migrate("three-instance-types.toml", &[]);
    let c = m.config();
    assert_eq!(c.fleet, "ci");
    assert_eq!(c.class_names(), ["ci-large", "ci-medium", "ci-small"]);
    assert_eq!(c.default_class, "ci-small");
    for (class, ty, max) in [
        ("ci-small", "t3.medium", 30),
        ("ci-medium", "m5.xlarge", 20),
        ("ci-large", "c5.4xlarge", 10),
    ] {
        assert_eq!(c.classes[class].instance_types, [ty]);
        assert_eq!(c.classes[class].max_machines, max);
        assert!(
            c.classes[class].job.is_none(),
            "the same docker options: [job] only"
        );
    }
    assert_eq!(c.max_machines, 60);
    assert_eq!(c.job.default_image, "alpine:3.20");

    // Each runner keeps its registration and points at its own class of the one fleet.
    let rc = m.runner_config();
    let rs = runners(&rc);
    assert_eq!(rs.len(), 3);
    for (r, (name, token)) in rs.iter().zip([
        ("ci-small", "glrt-SMALLSECRET000003"),
        ("ci-medium", "glrt-MEDIUMSECRET00004"),
        ("ci-large", "glrt-LARGESECRET000005"),
    ]) {
        assert_eq!(r["name"].as_str(), Some(name));
        assert_eq!(r["token"].as_str(), Some(token));
        assert_eq!(
            strings(&r["environment"]),
            [format!("FLOTILLA_CLASS={name}")]
        );
        assert_eq!(
            r["cache"]["s3"]["BucketName"].as_str(),
            Some("ci-runner-cache")
        );
        assert_eq!(
            strings(&r["custom"]["config_args"]),
            ["--config", "/etc/flotilla/flotilla.toml", "config"]
        );
    }
    m.line(
        "converted: ",
        "runners[2] \"ci-large\" environment: FLOTILLA_CLASS=ci-large added",
    );
    m.line(
        "default: default_class: ",
        "a job picks another with variables: { FLOTILLA_CLASS: <class> }",
    );
    m.line(
        "converted: ",
        "runners[1] \"ci-medium\" docker.image: [job] default_image",
    );
    m.line(
        "note: classes: ",
        "3 runners, ci-large, ci-medium, ci-small classes of one fleet and one daemon; they \
         differ in instance_types, idle_count, max_machines",
    );
    m.line(
        "action required: ",
        "runners[0] \"ci-small\" cache: kept: gitlab-runner signs the cache URLs",
    );
    m.assert_secrets_hidden(&[
        "glrt-SMALLSECRET000003",
        "glrt-MEDIUMSECRET00004",
        "glrt-LARGESECRET000005",
    ]);
}

#[test]
fn a_google_runner_is_refused_and_the_aws_runner_migrates_with_every_gap_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let from = fixture("unsupported-options.toml");
    let out_dir = tmp.path().join("out");
    let refused = flotilla(&[
        "migrate",
        "--from",
        from.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let err = text(&refused.stderr);
    assert!(
        err.contains("unsupported-options.toml"),
        "names the file: {err}"
    );
    assert!(
        err.contains("key `runners[1].machine.MachineDriver`"),
        "{err}"
    );
    assert!(err.contains("\"google\" is not supported"), "{err}");
    assert!(err.contains("--runner NAME"), "says how to go on: {err}");
    assert!(!out_dir.exists(), "nothing written when refused");

    let m = migrate("unsupported-options.toml", &["--runner", "legacy-aws"]);
    let c = m.config();
    assert_eq!(c.class_names(), ["legacy-aws"]);
    assert_eq!(c.aws.region.as_deref(), Some("us-west-2"));
    assert_eq!(
        c.on_shutdown,
        flotilla_proto::config::ShutdownPolicy::Terminate,
        "[machine.shutdown_drain] enabled"
    );
    assert_eq!(
        c.job.volumes,
        [
            "/certs/client",
            "/var/run/docker.sock:/var/run/docker.sock",
            "/srv/ci-data:/data:ro"
        ]
    );
    assert_eq!(c.job.container.dns, ["10.0.0.2"]);

    for (needle, what) in [
        (
            "machine.OffPeakPeriods",
            "ignored by gitlab-runner since 14.0",
        ),
        ("docker.cache_dir", "not in a host directory"),
        ("docker.disable_cache", "Flotilla always mounts"),
        ("docker.links", "use services:"),
        ("docker.network_mode", "one network per job"),
        ("docker.memory_swap", "only the hard limit"),
        ("docker.helper_image_flavor", "helper_image"),
        ("docker.services", "declare them in .gitlab-ci.yml"),
        (
            "amazonec2-userdata=",
            "bake what this script did into the AMI",
        ),
        ("amazonec2-open-port=8080", "security group"),
        ("amazonec2-monitoring=true", "Prometheus"),
        (
            "amazonec2-metadata-token=optional",
            "always requires IMDSv2",
        ),
        (
            "amazonec2-metadata-token-response-hop-limit=2",
            "imds_hop_limit, which also lets every job",
        ),
        ("amazonec2-block-duration-minutes=60", "max_age"),
        (
            "engine-storage-driver=overlay2",
            "AMI's /etc/docker/daemon.json",
        ),
    ] {
        let line = m.line("no equivalent: ", needle);
        assert!(line.contains(what), "{line}");
    }
    // A registry mirror now has a Flotilla key.
    let mirror = m.line(
        "converted: ",
        "engine-registry-mirror=http://10.11.12.13:12345",
    );
    assert!(mirror.contains("dockerd.registry_mirrors"), "{mirror}");
    let off_peak = m.line("no equivalent: ", "OffPeakPeriods");
    assert!(
        off_peak.contains("periods = [\"* 0-7,19-23 * * mon-fri\", \"* * * * sat,sun\"], timezone = \"America/New_York\", idle_count = 0, idle_time = \"300s\""),
        "the schedule to add: {off_peak}"
    );
    m.line("unknown key: ", "machine.IdleCountt");
    m.line("unknown key: ", "amazonec2-frobnicate=yes");
    m.line(
        "action required: ",
        "amazonec2-access-key, amazonec2-secret-key: AWS keys are not carried over",
    );
    m.line(
        "note: ",
        "amazonec2-volume-type=gp2: Flotilla's root volumes are gp3",
    );
    m.line("note: ", "docker+machine gave the machines public IPs");
    m.line(
        "converted: ",
        "docker.volumes[1] \"/certs/client\": [job] volumes; the docker executor kept this volume",
    );
    m.line(
        "kept: ",
        "runners[1] \"gce\": not selected with --runner: kept as it was",
    );
    m.line("kept: ", "runners[2] \"deploy-shell\": executor \"shell\"");
    m.line("kept: ", "pre_build_script");

    // The runners not migrated, and the [machine] section they still use, are untouched.
    let rc = m.runner_config();
    let rs = runners(&rc);
    assert_eq!(rs[0]["executor"].as_str(), Some("custom"));
    assert_eq!(rs[1]["executor"].as_str(), Some("docker+machine"));
    assert_eq!(rs[1]["machine"]["MachineDriver"].as_str(), Some("google"));
    assert_eq!(rs[2]["executor"].as_str(), Some("shell"));
    assert!(rc["machine"]["shutdown_drain"]["enabled"]
        .as_bool()
        .unwrap());
    m.assert_secrets_hidden(&[
        "glrt-LEGACYSECRET00006",
        "glrt-GCESECRET00000007",
        "glrt-SHELLSECRET000008",
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ]);
    assert!(!m.file("flotilla.toml").contains("AKIAIOSFODNN7EXAMPLE"));
}

#[test]
fn the_s3_cache_is_kept_and_the_iam_profile_carried_over() {
    let m = migrate("s3-cache-iam.toml", &["--state-dir", "/srv/flotilla"]);
    let c = m.config();
    assert_eq!(c.state_dir, Path::new("/srv/flotilla"));
    let class = &c.classes["aws-iam"];
    assert_eq!(class.instance_profile.as_deref(), Some("ci-build-machine"));
    assert_eq!(class.security_groups, ["sg-0f0f0f0f0f0f0f0f0"]);
    assert_eq!(class.root_volume_gb, Some(100));
    assert_eq!(c.job.allowed_images, ["node:*", "registry.example.com/**"]);
    assert_eq!(c.job.allowed_services, ["postgres:*", "redis:*"]);
    assert_eq!(
        c.job.pull_policy,
        [flotilla_proto::config::PullPolicy::IfNotPresent],
        "a single pull_policy string"
    );

    let rc = m.runner_config();
    let r = &runners(&rc)[0];
    let cache = r["cache"].as_table().unwrap();
    assert_eq!(cache["Type"].as_str(), Some("s3"));
    assert_eq!(cache["Path"].as_str(), Some("runner-cache"));
    assert_eq!(cache["s3"]["AuthenticationType"].as_str(), Some("iam"));
    assert_eq!(
        cache["s3"]["ServerSideEncryptionKeyID"].as_str(),
        Some("alias/ci-cache")
    );
    assert_eq!(r["feature_flags"]["FF_USE_FASTZIP"].as_bool(), Some(true));
    assert_eq!(rc["listen_address"].as_str(), Some(":9252"));

    let line = m.line("action required: ", "cache: kept");
    assert!(line.contains("arn:aws:s3:::acme-ci-cache/*"), "{line}");
    assert!(line.contains("kms:GenerateDataKey"), "{line}");
    m.line("converted: ", "amazonec2-iam-instance-profile=ci-build-machine: classes.aws-iam.instance_profile; job containers cannot use its credentials");
    m.line(
        "converted: ",
        "amazonec2-metadata-token=required: Flotilla always requires IMDSv2 tokens",
    );
    m.line(
        "converted: ",
        "amazonec2-metadata-token-response-hop-limit=1",
    );
    assert!(
        !m.report().contains("no equivalent: "),
        "everything of this runner converts:\n{}",
        m.report()
    );
    m.assert_secrets_hidden(&["glrt-IAMSECRETTOKEN009"]);
}

#[test]
fn outputs_are_not_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.toml"), "# mine\n").unwrap();
    let from = fixture("single-spot.toml");
    let args = [
        "migrate",
        "--from",
        from.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ];
    let refused = flotilla(&args);
    assert_eq!(refused.status.code(), Some(2));
    let err = text(&refused.stderr);
    assert!(
        err.contains("config.toml already exists: use --force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("config.toml")).unwrap(),
        "# mine\n"
    );
    assert!(
        !out.join("flotilla.toml").exists(),
        "nothing written when refused"
    );

    let forced = flotilla(&[&args[..], &["--force"]].concat());
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    assert!(std::fs::read_to_string(out.join("config.toml"))
        .unwrap()
        .contains("executor = \"custom\""));

    // Never the input itself, even with --force.
    let input_dir = tmp.path().join("runner");
    std::fs::create_dir_all(&input_dir).unwrap();
    let input = input_dir.join("config.toml");
    std::fs::copy(&from, &input).unwrap();
    let onto_input = flotilla(&[
        "migrate",
        "--from",
        input.to_str().unwrap(),
        "--out-dir",
        input_dir.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(onto_input.status.code(), Some(2));
    assert!(text(&onto_input.stderr).contains("is the input file"));
}

#[test]
fn bad_input_exits_2_naming_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |content: &str, extra: &[&str]| {
        let from = tmp.path().join("config.toml");
        std::fs::write(&from, content).unwrap();
        let mut args = vec![
            "migrate",
            "--from",
            from.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = flotilla(&args);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o.stdout));
        let err = text(&o.stderr);
        assert!(
            err.contains(from.to_str().unwrap()),
            "names the file: {err}"
        );
        assert!(!err.contains("glrt-"), "never a token: {err}");
        err
    };
    let spot = std::fs::read_to_string(fixture("single-spot.toml")).unwrap();
    let err = run(&spot.replace("IdleCount = 2", "IdleCount = \"two\""), &[]);
    assert!(
        err.contains("key `runners[0].machine.IdleCount`: expected an integer, found string"),
        "{err}"
    );
    let err = run(
        &spot.replace("amazonec2-root-size=40", "amazonec2-root-size=forty"),
        &[],
    );
    assert!(
        err.contains("key `runners[0].machine.MachineOptions[9]`"),
        "{err}"
    );
    assert!(err.contains("must be a number of GiB"), "{err}");
    let err = run(&spot.replace("shm_size = 0", "shm_size = \"lots\""), &[]);
    assert!(err.contains("key `runners[0].docker.shm_size`"), "{err}");
    let err = run(
        &spot.replace(
            "token = \"glrt-SPOTSECRETTOKEN0001\"",
            "token = \"glrt-SPOTSECRETTOKEN0001",
        ),
        &[],
    );
    assert!(
        err.contains("not valid TOML") && err.contains("line 14"),
        "{err}"
    );
    let err = run(&spot, &["--runner", "nobody"]);
    assert!(
        err.contains("--runner \"nobody\"") && err.contains("\"aws-spot\""),
        "{err}"
    );
    let err = run(
        "concurrent = 1\n[[runners]]\nname = \"s\"\nexecutor = \"shell\"\n",
        &[],
    );
    assert!(err.contains("nothing to migrate"), "{err}");
    assert!(!out.exists());

    let missing = flotilla(&[
        "migrate",
        "--from",
        "/nonexistent/config.toml",
        "--out-dir",
        "/tmp/x",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("cannot read /nonexistent/config.toml"));
    let with_config = flotilla(&[
        "--config",
        "/etc/flotilla/flotilla.toml",
        "migrate",
        "--from",
        "/nonexistent/config.toml",
        "--out-dir",
        "/tmp/x",
    ]);
    assert_eq!(with_config.status.code(), Some(2));
    assert!(text(&with_config.stderr).contains("--config-path"));
}
