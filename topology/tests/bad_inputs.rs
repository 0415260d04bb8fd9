//! Bad topology files: every error is reported with the exact line and column
//! (1-based, column in characters) and a message saying what was wrong.
//!
//! Texts start on the line after `r#"`; `ID1`..`ID9` are replaced with real
//! node ids (`NodeId::from_public_key(&[n; 32])`).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use drmesh_topology::{FleeceGuard, NodeId, QemuSocket, QemuTls, SourceKind, Topology};

fn id(n: u8) -> String {
    NodeId::from_public_key(&[n; 32]).to_string()
}

fn expand(text: &str) -> String {
    let mut text = text.strip_prefix('\n').unwrap_or(text).to_string();
    for n in 1..=9u8 {
        text = text.replace(&format!("ID{n}"), &id(n));
    }
    text
}

/// Errors of `text` (as if read from `origin`) as (line, column, message).
fn errors_at(text: &str, origin: &Path) -> Vec<(usize, usize, String)> {
    match Topology::parse(&expand(text), origin) {
        Ok(_) => panic!("accepted:\n{}", expand(text)),
        Err(diags) => {
            for d in diags.iter() {
                assert_eq!(d.file, origin);
            }
            diags.into_iter().map(|d| (d.line, d.column, d.message)).collect()
        }
    }
}

fn errors(text: &str) -> Vec<(usize, usize, String)> {
    errors_at(text, Path::new("/etc/drmesh/topology.toml"))
}

/// Asserts exactly one error, at `line`:`column`, whose message contains `fragment`.
#[track_caller]
fn assert_one(text: &str, line: usize, column: usize, fragment: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert_error(&errs[0], line, column, fragment);
}

#[track_caller]
fn assert_error(err: &(usize, usize, String), line: usize, column: usize, fragment: &str) {
    assert_eq!((err.0, err.1), (line, column), "position of {:?}", err.2);
    assert!(err.2.contains(fragment), "message {:?} lacks {fragment:?}", err.2);
}

/// A valid file; tests below start from it (lines 1-26).
const GOOD: &str = r#"
[mesh]
name = "m"
version = 1

[[node]]
name = "a"
id = "ID1"
addresses = ["10.0.0.1:7400"]
site = "s"

[[node]]
name = "b"
id = "ID2"
addresses = ["10.0.0.2:7400"]
site = "s"

[[volume]]
name = "v"
source = "a"
kind = "file"
path = "/img"
targets = ["b"]
policy = "p"

[policy.p]
rpo = "15m"
"#;

/// `GOOD` with line `line` (1-based) replaced by `with` (which may span several lines).
fn edit(line: usize, with: &str) -> String {
    let text = expand(GOOD);
    let mut lines: Vec<&str> = text.lines().collect();
    lines[line - 1] = with;
    lines.join("\n") + "\n"
}

#[test]
fn the_base_file_is_good() {
    Topology::parse(&expand(GOOD), Path::new("t.toml")).unwrap();
}

// ---- syntax -------------------------------------------------------------

#[test]
fn syntax_error_unterminated_string() {
    // toml reports the missing quote where the line ends.
    let errs = errors(&edit(3, "version = \"1"));
    assert!(!errs.is_empty());
    assert_error(&errs[0], 3, 13, "TOML syntax error: invalid basic string");
}

#[test]
fn syntax_error_missing_value() {
    assert_one(&edit(2, "name ="), 2, 7, "TOML syntax error");
}

#[test]
fn syntax_error_duplicate_key() {
    assert_one(&edit(3, "version = 1\nversion = 2"), 4, 1, "duplicate key");
}

// ---- unknown keys at each level ----------------------------------------

#[test]
fn unknown_top_level_key() {
    let errs = errors(&edit(25, "[policies.p]"));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 23, 10, "undefined policy \"p\"; no [policy.NAME] table is defined");
    assert_error(
        &errs[1],
        25,
        2,
        "unknown key `policies` in the top level; allowed keys: mesh, site, node, platform, volume, link, group, policy",
    );
}

#[test]
fn unknown_key_in_mesh() {
    assert_one(
        &edit(3, "version = 1\nowner = \"ops\""),
        4,
        1,
        "unknown key `owner` in [mesh]; allowed keys: name, version",
    );
}

#[test]
fn unknown_key_in_node() {
    assert_one(
        &edit(9, "site = \"s\"\nport = 7400"),
        10,
        1,
        "unknown key `port` in [[node]]; allowed keys: name, id, addresses, listen, site, labels",
    );
}

#[test]
fn unknown_key_in_volume() {
    assert_one(
        &edit(23, "policy = \"p\"\nschedule = \"x\""),
        24,
        1,
        "unknown key `schedule` in [[volume]]; allowed keys: name, source, kind, targets, policy, hooks, free_space, path, device, cow_store, state_store, monitor, node, fleece_dir, fleece_reserve, fleece_max, nbd, guest_agent, tls, tls_object",
    );
}

#[test]
fn unknown_key_in_policy() {
    assert_one(
        &edit(26, "rpo = \"15m\"\nrto = \"1h\""),
        27,
        1,
        "unknown key `rto` in [policy.p]; allowed keys: rpo, retention, block_size",
    );
}

#[test]
fn unknown_key_in_retention() {
    assert_one(
        &edit(26, "rpo = \"15m\"\nretention = { keep_last = 3, monthly = 2 }"),
        27,
        30,
        "unknown key `monthly` in `retention` of [policy.p]; allowed keys: keep_last, hourly, daily, weekly",
    );
}

#[test]
fn unknown_key_in_bandwidth_window() {
    let text = edit(
        26,
        "rpo = \"15m\"\n[policy.p.bandwidth]\nwindows = [{ days = \"mon\", from = \"08:00\", to = \"09:00\", limit = \"1Mbit\", until = \"x\" }]",
    );
    assert_one(&text, 28, 75, "unknown key `until` in a bandwidth window; allowed keys: days, from, to, limit");
}

#[test]
fn unknown_key_in_drill() {
    assert_one(
        &edit(26, "rpo = \"15m\"\ndrill = { schedule = \"daily 02:00\", check = [\"fsck\"] }"),
        27,
        37,
        "unknown key `check` in `drill` of [policy.p]; allowed keys: schedule, checks",
    );
}

// ---- types and values ---------------------------------------------------

#[test]
fn version_as_string_is_a_type_error() {
    assert_one(&edit(3, "version = \"1\""), 3, 11, "`version` in [mesh] must be an integer, found a string (\"1\")");
}

#[test]
fn mesh_version_zero() {
    assert_one(&edit(3, "version = 0"), 3, 11, "`version` in [mesh] must be at least 1, found 0");
}

#[test]
fn addresses_as_string_is_a_type_error() {
    assert_one(
        &edit(8, "addresses = \"10.0.0.1:7400\""),
        8,
        13,
        "`addresses` in [[node]] must be a list of strings, found a string",
    );
}

#[test]
fn targets_with_a_number() {
    assert_one(
        &edit(22, "targets = [\"b\", 2]"),
        22,
        17,
        "entries of `targets` in [[volume]] must be strings, found an integer (2)",
    );
}

#[test]
fn bad_duration() {
    assert_one(&edit(26, "rpo = \"15x\""), 26, 7, "`rpo` in [policy.p]: bad duration \"15x\"");
}

#[test]
fn duration_without_unit() {
    assert_one(&edit(26, "rpo = \"15\""), 26, 7, "duration \"15\" has no unit");
}

#[test]
fn bad_size() {
    assert_one(&edit(26, "rpo = \"15m\"\nblock_size = \"1 megabyte\""), 27, 14, "unknown unit \"megabyte\"");
}

#[test]
fn block_size_not_a_power_of_two() {
    assert_one(
        &edit(26, "rpo = \"15m\"\nblock_size = \"100KiB\""),
        27,
        14,
        "102400 bytes is not a power of two; expected a power of two from 64KiB to 16MiB",
    );
}

#[test]
fn block_size_out_of_range() {
    assert_one(&edit(26, "rpo = \"15m\"\nblock_size = 32768"), 27, 14, "32768 bytes is out of range");
}

#[test]
fn bad_rate() {
    assert_one(
        &edit(26, "rpo = \"15m\"\nbandwidth = { limit = \"100Mbyte\" }"),
        27,
        23,
        "bad rate \"100Mbyte\": unknown unit \"Mbyte\"",
    );
}

#[test]
fn bad_window_time() {
    let text = edit(26, "rpo = \"15m\"\nbandwidth = { windows = [{ days = \"mon-fri\", from = \"8am\", to = \"18:00\", limit = \"unlimited\" }] }");
    assert_one(&text, 27, 53, "`from` in a bandwidth window: bad time \"8am\"; expected a time \"HH:MM\"");
}

#[test]
fn bad_window_days() {
    let text = edit(26, "rpo = \"15m\"\n[[policy.p.bandwidth.windows]]\ndays = \"mon-fry\"\nfrom = \"08:00\"\nto = \"18:00\"\nlimit = \"5Mbit\"");
    assert_one(&text, 28, 8, "bad day \"fry\"");
}

#[test]
fn bad_compression_level() {
    assert_one(
        &edit(26, "rpo = \"15m\"\ncompression = \"zstd:20\""),
        27,
        15,
        "zstd level 20 is out of range; expected \"off\", \"zstd\" or \"zstd:N\" with N from -7 to 19",
    );
}

#[test]
fn unknown_compression() {
    assert_one(&edit(26, "rpo = \"15m\"\ncompression = \"lz4\""), 27, 15, "unknown compression \"lz4\"");
}

#[test]
fn retention_keep_last_zero() {
    assert_one(
        &edit(26, "rpo = \"15m\"\n[policy.p.retention]\nkeep_last = 0"),
        28,
        13,
        "`keep_last` in `retention` of [policy.p] must be at least 1, found 0",
    );
}

#[test]
fn bad_drill_schedule() {
    assert_one(
        &edit(26, "rpo = \"15m\"\n[policy.p.drill]\nschedule = \"monthly 1st\""),
        28,
        12,
        "bad schedule \"monthly 1st\"; expected \"daily HH:MM\"",
    );
}

#[test]
fn unknown_drill_check() {
    assert_one(
        &edit(26, "rpo = \"15m\"\ndrill = { schedule = \"every 6h\", checks = [\"fsck\", \"mysql\"] }"),
        27,
        52,
        "unknown drill check \"mysql\"",
    );
}

// ---- nodes --------------------------------------------------------------

#[test]
fn duplicate_node_name() {
    let errs = errors(&edit(12, "name = \"a\""));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 12, 8, "duplicate node name \"a\" (first defined on line 6)");
    assert_error(&errs[1], 22, 12, "target \"b\" is not a [[node]] name");
}

#[test]
fn duplicate_node_id() {
    assert_one(&edit(13, "id = \"ID1\""), 13, 6, "duplicate node id");
}

#[test]
fn duplicate_address() {
    assert_one(
        &edit(14, "addresses = [\"10.0.0.3:7400\", \"10.0.0.1:7400\"]"),
        14,
        31,
        "duplicate address \"10.0.0.1:7400\" (already listed on line 8)",
    );
}

#[test]
fn duplicate_address_after_normalization() {
    let text = edit(8, "addresses = [\"[::1]:7400\", \"GW.example.com:7400\"]");
    let text = text.replace("\"10.0.0.2:7400\"", "\"[0::0001]:7400\", \"gw.example.com.:7400\"");
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 14, 14, "duplicate address \"[0::0001]:7400\"");
    assert_error(&errs[1], 14, 32, "duplicate address \"gw.example.com.:7400\"");
}

#[test]
fn bad_node_id_check_character() {
    let good = id(2);
    // A typo in the third group: change one character to another letter.
    let mut typo: Vec<char> = good.chars().collect();
    typo[17] = if typo[17] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    assert_one(
        &edit(13, &format!("id = \"{typo}\"")),
        13,
        6,
        "bad node `id`: node id check character 2 of 4 does not match",
    );
}

#[test]
fn bad_node_id_length() {
    let short = &id(2)[..55];
    assert_one(&edit(13, &format!("id = \"{short}\"")), 13, 6, "node id has 49 characters, expected 56");
}

#[test]
fn bad_node_id_character() {
    assert_one(&edit(13, &format!("id = \"1{}\"", &id(2)[1..])), 13, 6, "node id has '1' at character 1");
}

#[test]
fn bad_volume_names() {
    assert_one(&edit(18, "name = \"../etc\""), 18, 8, "bad volume name \"../etc\": '.' at character 1; expected lower-case letters, digits");
    assert_one(&edit(18, "name = \"db/1\""), 18, 8, "bad volume name \"db/1\": '/' at character 3");
    // One rule for every place a name goes (gossip items, manifest folders): at most 128 bytes.
    assert_one(&edit(18, &format!("name = \"{}\"", "v".repeat(129))), 18, 8, "volume name of 129 bytes is longer than 128");
    Topology::parse(&edit(18, &format!("name = \"{}\"", "v".repeat(128))), Path::new("t.toml")).unwrap();
}

#[test]
fn bad_node_name() {
    let errs = errors(&edit(12, "name = \"Web 1\""));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 12, 8, "bad node name \"Web 1\"; expected lower-case letters, digits");
    // The volume's target "b" is gone with the rename: reported too.
    assert_error(&errs[1], 22, 12, "target \"b\" is not a [[node]] name");
}

#[test]
fn ipv6_address_without_brackets() {
    assert_one(&edit(14, "addresses = [\"::1:7400\"]"), 14, 14, "IPv6 addresses must be in brackets");
}

#[test]
fn address_without_port() {
    assert_one(&edit(14, "addresses = [\"gw.example.com\"]"), 14, 14, "bad address \"gw.example.com\": missing port");
}

#[test]
fn bad_listen() {
    assert_one(
        &edit(9, "site = \"s\"\nlisten = \"localhost:7400\""),
        10,
        10,
        "bad `listen` \"localhost:7400\": expected an IP socket address",
    );
}

#[test]
fn missing_node_site_points_at_the_header() {
    assert_one(&edit(15, ""), 11, 1, "missing required key `site` in [[node]]; expected a string");
}

#[test]
fn unknown_site() {
    let text = edit(3, "version = 1\n[[site]]\nname = \"s\"\n[[site]]\nname = \"t\"");
    let text = text.replacen("site = \"s\"", "site = \"x\"", 1);
    assert_one(&text, 13, 8, "unknown site \"x\"; expected one of the [[site]] names: \"s\", \"t\"");
}

#[test]
fn site_written_as_a_single_table() {
    assert_one(
        &edit(3, "version = 1\n[site]\nname = \"s\""),
        4,
        1,
        "`site` must be an array of tables ([[site]]), found a table",
    );
}

#[test]
fn label_values_must_be_strings_and_columns_count_characters() {
    assert_one(
        &edit(9, "site = \"s\"\nlabels = { \"é\" = \"ü\", rack = 12 }"),
        10,
        30,
        "label `rack` must be a string, found an integer (12)",
    );
}

#[test]
fn missing_mesh() {
    let text = expand(GOOD).replacen("[mesh]\nname = \"m\"\nversion = 1\n", "", 1);
    assert_one(&text, 1, 1, "missing [mesh] table");
}

// ---- volumes ------------------------------------------------------------

#[test]
fn undefined_source_node() {
    assert_one(&edit(19, "source = \"c\""), 19, 10, "volume source \"c\" is not a [[node]] name");
}

#[test]
fn undefined_target_node() {
    assert_one(&edit(22, "targets = [\"b\", \"zz\"]"), 22, 17, "target \"zz\" is not a [[node]] name");
}

#[test]
fn undefined_policy() {
    assert_one(&edit(23, "policy = \"gold\""), 23, 10, "undefined policy \"gold\"; expected one of \"p\"");
}

#[test]
fn target_is_the_source() {
    assert_one(&edit(22, "targets = [\"b\", \"a\"]"), 22, 17, "target \"a\" is the volume's source");
}

#[test]
fn duplicate_targets() {
    assert_one(&edit(22, "targets = [\"b\", \"b\"]"), 22, 17, "target \"b\" is listed twice");
}

#[test]
fn empty_targets() {
    assert_one(&edit(22, "targets = []"), 22, 11, "`targets` in [[volume]] is empty");
}

#[test]
fn missing_volume_fields_point_at_the_header() {
    let errs = errors(&edit(23, "").replace("source = \"a\"\n", ""));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 17, 1, "missing required key `source` in [[volume]]");
    assert_error(&errs[1], 17, 1, "missing required key `policy` in [[volume]]");
}

#[test]
fn bad_kind() {
    assert_one(
        &edit(20, "kind = \"iscsi\""),
        20,
        8,
        "unknown volume kind \"iscsi\"; expected one of \"file\", \"kmod\", \"qemu\", \"ebs\"",
    );
}

#[test]
fn setting_of_the_wrong_kind() {
    assert_one(
        &edit(21, "path = \"/img\"\ndevice = \"/dev/sdb\""),
        22,
        1,
        "`device` is a setting of kind \"kmod\", not \"file\"",
    );
}

#[test]
fn kmod_device_outside_dev() {
    assert_one(
        &edit(20, "kind = \"kmod\"").replace("path = \"/img\"", "device = \"/img\"\ncow_store = \"/dev/sdc\""),
        21,
        10,
        "must be a /dev/... device path",
    );
}

#[test]
fn kmod_needs_a_cow_store_on_another_device() {
    let kmod = edit(20, "kind = \"kmod\"");
    assert_one(
        &kmod.replace("path = \"/img\"", "device = \"/dev/sdb\""),
        17,
        1,
        "missing required key `cow_store` in [[volume]]",
    );
    assert_one(
        &kmod.replace("path = \"/img\"", "device = \"/dev/sdb\"\ncow_store = \"sdc\""),
        22,
        13,
        "`cow_store` in [[volume]] must be a /dev/... device path, found \"sdc\"",
    );
    assert_one(
        &kmod.replace("path = \"/img\"", "device = \"/dev/sdb\"\ncow_store = \"/dev/sdb\""),
        22,
        13,
        "`cow_store` \"/dev/sdb\" is the tracked device itself",
    );
    // `cow_store` belongs to kind "kmod" only.
    assert_one(&edit(21, "path = \"/img\"\ncow_store = \"/dev/sdc\""), 22, 1, "`cow_store` is a setting of kind \"kmod\", not \"file\"");
    let good = kmod.replace("path = \"/img\"", "device = \"/dev/sdb\"\ncow_store = \"/dev/sdc\"");
    let topo = Topology::parse(&good, Path::new("t.toml")).unwrap();
    assert_eq!(
        topo.volumes[0].kind,
        drmesh_topology::SourceKind::Kmod { device: "/dev/sdb".into(), cow_store: "/dev/sdc".into(), state_store: None }
    );
}

#[test]
fn kmod_state_store_is_a_device_of_its_own() {
    let kmod = edit(20, "kind = \"kmod\"");
    let with = |state: &str| kmod.replace("path = \"/img\"", &format!("device = \"/dev/sdb\"\ncow_store = \"/dev/sdc\"\nstate_store = \"{state}\""));
    assert_one(&with("/dev/sdb"), 23, 15, "`state_store` \"/dev/sdb\" is the tracked device itself");
    assert_one(&with("/dev/sdc"), 23, 15, "`state_store` \"/dev/sdc\" is also the `cow_store`");
    assert_one(&with("sdd"), 23, 15, "`state_store` in [[volume]] must be a /dev/... device path, found \"sdd\"");
    let topo = Topology::parse(&with("/dev/sdd"), Path::new("t.toml")).unwrap();
    assert_eq!(
        topo.volumes[0].kind,
        drmesh_topology::SourceKind::Kmod { device: "/dev/sdb".into(), cow_store: "/dev/sdc".into(), state_store: Some("/dev/sdd".into()) }
    );
    // One volume's state store is not another's device.
    let second = "\n[[volume]]\nname = \"w\"\nsource = \"a\"\nkind = \"kmod\"\ndevice = \"/dev/sdd\"\ncow_store = \"/dev/sde\"\ntargets = [\"b\"]\npolicy = \"p\"\n";
    let errs = errors(&(with("/dev/sdd") + second));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].2.contains("already a kmod device, COW store or state store"), "{errs:#?}");
}

#[test]
fn kmod_devices_and_cow_stores_are_not_shared_on_a_node() {
    let base = edit(20, "kind = \"kmod\"").replace("path = \"/img\"", "device = \"/dev/sdb\"\ncow_store = \"/dev/sdc\"");
    // Line 29 onwards: a second volume of node a whose COW store is the first one's device.
    let second = "\n[[volume]]\nname = \"w\"\nsource = \"a\"\nkind = \"kmod\"\ndevice = \"/dev/sdd\"\ncow_store = \"/dev/sdb\"\ntargets = [\"b\"]\npolicy = \"p\"\n";
    let text = base.clone() + second;
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let line = text.lines().position(|l| l == "cow_store = \"/dev/sdb\"").unwrap() + 1;
    assert_error(&errs[0], line, 13, "\"/dev/sdb\" of node \"a\" is already a kmod device, COW store or state store on line 21");
    // The same paths on another node are that node's own devices.
    let other_node = second.replace("source = \"a\"", "source = \"b\"").replace("targets = [\"b\"]", "targets = [\"a\"]");
    Topology::parse(&(base + &other_node), Path::new("t.toml")).unwrap();
}

#[test]
fn relative_file_path() {
    assert_one(&edit(21, "path = \"img\""), 21, 8, "`path` in [[volume]] must be an absolute path");
}

#[test]
fn qemu_names_its_monitor_node_and_fleece_dir_and_ebs_checks_volume_id() {
    let qemu = edit(20, "kind = \"qemu\"").replace("path = \"/img\"", "monitor = \"/run/vm1.qmp\"\nnode = \"disk0\"\nfleece_dir = \"/var/lib/fleece\"");
    let t = Topology::parse(&qemu, Path::new("t.toml")).unwrap();
    assert_eq!(
        t.volumes[0].kind,
        SourceKind::Qemu {
            monitor: QemuSocket::Unix("/run/vm1.qmp".into()),
            node: "disk0".into(),
            fleece_dir: "/var/lib/fleece".into(),
            nbd: QemuSocket::Unix("/var/lib/fleece/nbd.sock".into()),
            guest_agent: None,
            fleece_guard: FleeceGuard::Reserve(1 << 30),
            tls: None
        }
    );
    assert_one(&qemu.replace("node = \"disk0\"", "node = \"0disk\""), 22, 8, "`node` \"0disk\": a block node name starts with a letter");
    assert_one(&qemu.replace("node = \"disk0\"", "node = \"disk zero\""), 22, 8, "only letters, digits");
    assert_one(&qemu.replace("\nfleece_dir = \"/var/lib/fleece\"", ""), 17, 1, "missing required key `fleece_dir` in [[volume]]");
    assert_one(&qemu.replace("fleece_dir = \"/var/lib/fleece\"", "fleece_dir = \"/var/lib/fleece\"\nnbd = \"nbd.sock\""), 24, 7, "`nbd` in [[volume]] must be an absolute path");
    assert_one(&qemu.replace("node = \"disk0\"", "node = \"disk0\"\nguest_agent = \"qga.sock\""), 23, 15, "`guest_agent` in [[volume]] must be an absolute path");
    assert_one(&qemu.replace("node = \"disk0\"", "node = \"disk0\"\nfleece_reserve = \"lots\""), 23, 18, "`fleece_reserve`: bad size \"lots\"");
    // qemu's NBD server deletes what is at its path: never the monitor or the agent's socket.
    let same = qemu.replace("node = \"disk0\"", "node = \"disk0\"\nnbd = \"/run/vm1.qmp\"");
    assert_one(&same, 23, 1, "the NBD socket \"/run/vm1.qmp\" is also the `monitor`");
    let same = qemu.replace("monitor = \"/run/vm1.qmp\"", "monitor = \"/var/lib/fleece/nbd.sock\"");
    assert_one(&same, 21, 1, "the NBD socket \"/var/lib/fleece/nbd.sock\" is also the `monitor`");
    let same = qemu.replace("node = \"disk0\"", "node = \"disk0\"\nguest_agent = \"/run/vm1.qmp\"");
    assert_one(&same, 23, 1, "`guest_agent` is the `monitor` socket");
    // One volume per VM disk of a node.
    let second = "\n[[volume]]\nname = \"w\"\nsource = \"a\"\nkind = \"qemu\"\nmonitor = \"/run/vm1.qmp\"\nnode = \"disk0\"\nfleece_dir = \"/f\"\nnbd = \"/var/lib/fleece/nbd.sock\"\ntargets = [\"b\"]\npolicy = \"p\"\n";
    let text = qemu.clone() + second;
    let line = text.lines().enumerate().filter(|(_, l)| *l == "node = \"disk0\"").last().unwrap().0 + 1;
    assert_one(&text, line, 1, "block node \"disk0\" of monitor \"/run/vm1.qmp\" on node \"a\" is already a volume on line 22");
    // Another disk of the VM: qemu runs one NBD server, so it names the same socket.
    let other = qemu.clone() + &second.replace("node = \"disk0\"", "node = \"disk1\"");
    Topology::parse(&other, Path::new("t.toml")).unwrap();
    let apart = other.replace("nbd = \"/var/lib/fleece/nbd.sock\"", "nbd = \"/f/nbd.sock\"");
    let line = apart.lines().enumerate().filter(|(_, l)| *l == "node = \"disk1\"").last().unwrap().0 + 1;
    assert_one(&apart, line, 1, "nbd \"/f/nbd.sock\" differs from \"/var/lib/fleece/nbd.sock\" of the volume of the same monitor on line 22; qemu runs one NBD server");
    // The settings of the first design (an NBD address and a bitmap name) are gone.
    let errs = errors(&qemu.replace("node = \"disk0\"", "node = \"disk0\"\nbitmap = \"drmesh\""));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].2.contains("bitmap"), "{errs:#?}");
    let ebs = edit(20, "kind = \"ebs\"").replace("path = \"/img\"", "volume_id = \"i-123\"\nregion = \"eu-west-1\"");
    assert_one(&ebs, 21, 13, "bad `volume_id` \"i-123\"; expected an EBS volume id");
}

#[test]
fn qemu_over_tcp_is_reached_with_tls_and_keeps_its_sockets_on_one_machine() {
    let tcp = edit(20, "kind = \"qemu\"").replace("path = \"/img\"", "monitor = \"tcp:hv1.example:4444\"\nnode = \"disk0\"\nfleece_dir = \"/var/lib/fleece\"\ntls = \"/etc/drmesh/qemu-tls\"");
    let t = Topology::parse(&tcp, Path::new("t.toml")).unwrap();
    assert_eq!(
        t.volumes[0].kind,
        SourceKind::Qemu {
            monitor: QemuSocket::Tcp { host: "hv1.example".into(), port: 4444 },
            node: "disk0".into(),
            fleece_dir: "/var/lib/fleece".into(),
            nbd: QemuSocket::Tcp { host: "hv1.example".into(), port: 10809 },
            guest_agent: None,
            fleece_guard: FleeceGuard::Max(4 << 30),
            tls: Some(QemuTls { dir: "/etc/drmesh/qemu-tls".into(), object: None }),
        }
    );
    // IPv6 in brackets, every socket over TCP, the size bound and the qemu object named.
    let v6 = tcp
        .replace("tcp:hv1.example:4444", "tcp:[fd00::1]:4444")
        .replace("node = \"disk0\"", "node = \"disk0\"\nnbd = \"tcp:[fd00::1]:10810\"\nguest_agent = \"tcp:[fd00::1]:4445\"\nfleece_max = \"2GiB\"\ntls_object = \"tls0\"");
    let t = Topology::parse(&v6, Path::new("t.toml")).unwrap();
    let SourceKind::Qemu { monitor, nbd, guest_agent, fleece_guard, tls, .. } = &t.volumes[0].kind else { panic!("not qemu") };
    assert_eq!(monitor.to_string(), "tcp:[fd00::1]:4444");
    assert_eq!(nbd, &QemuSocket::Tcp { host: "fd00::1".into(), port: 10810 });
    assert_eq!(guest_agent, &Some(QemuSocket::Tcp { host: "fd00::1".into(), port: 4445 }));
    assert_eq!(fleece_guard, &FleeceGuard::Max(2 << 30));
    assert_eq!(tls.as_ref().and_then(|t| t.object.as_deref()), Some("tls0"));
    // Never over TCP without TLS.
    assert_one(&tcp.replace("\ntls = \"/etc/drmesh/qemu-tls\"", ""), 21, 1, "a monitor over TCP is reached with TLS only: expected `tls`");
    // Addresses that are not one.
    for bad in ["tcp:hv1", "tcp:hv1:0", "tcp:hv1:70000", "tcp::4444", "tcp:fd00::1:4444", "tcp:[hv1]:4444", "tcp:hv 1:4444"] {
        let text = tcp.replace("tcp:hv1.example:4444", bad);
        assert_one(&text, 21, 11, &format!("`monitor` {bad:?}: expected an absolute path of a Unix socket, or tcp:HOST:PORT"));
    }
    // A VM's sockets are all on its machine.
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\nnbd = \"/run/nbd.sock\""), 23, 1, "`nbd` is on the monitor's machine: expected over TCP");
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\nguest_agent = \"/run/qga.sock\""), 23, 1, "`guest_agent` is on the monitor's machine: expected over TCP");
    let unix = edit(20, "kind = \"qemu\"").replace("path = \"/img\"", "monitor = \"/run/vm1.qmp\"\nnode = \"disk0\"\nfleece_dir = \"/var/lib/fleece\"");
    assert_one(&unix.replace("node = \"disk0\"", "node = \"disk0\"\nnbd = \"tcp:localhost:10809\""), 23, 1, "`nbd` is on the monitor's machine: expected a Unix socket");
    // Settings of the other side.
    assert_one(&unix.replace("node = \"disk0\"", "node = \"disk0\"\ntls = \"/etc/t\""), 23, 1, "`tls` is for a monitor over TCP");
    assert_one(&unix.replace("node = \"disk0\"", "node = \"disk0\"\nfleece_max = \"1GiB\""), 23, 1, "`fleece_max` is not a setting of this volume");
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\nfleece_reserve = \"1GiB\""), 23, 1, "`fleece_reserve` is not a setting of this volume: a monitor over TCP");
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\nfleece_max = \"1MiB\""), 23, 14, "`fleece_max` 1 MiB is under 64 MiB");
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\ntls_object = \"0x\""), 23, 14, "`tls_object` \"0x\": expected the id of qemu's tls-creds-x509 object");
    assert_one(&tcp.replace("node = \"disk0\"", "node = \"disk0\"\nnbd = \"tcp:hv1.example:4444\""), 23, 1, "the NBD socket \"tcp:hv1.example:4444\" is also the `monitor`");
}

// ---- key files ----------------------------------------------------------

fn key_errors(contents: &[u8], mode: u32) -> Vec<(usize, usize, String)> {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("keys")).unwrap();
    let key = dir.path().join("keys/k.key");
    fs::write(&key, contents).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
    let text = edit(26, "rpo = \"15m\"\nencryption_key_file = \"keys/k.key\"");
    errors_at(&text, &dir.path().join("topology.toml"))
}

#[test]
fn key_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(26, "rpo = \"15m\"\nencryption_key_file = \"keys/none.key\"");
    let errs = errors_at(&text, &dir.path().join("topology.toml"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 27, 23, "keys/none.key does not exist");
}

#[test]
fn key_file_open_to_others() {
    let errs = key_errors(&[1; 32], 0o644);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 27, 23, "has mode 0644, open to group or others; expected 0600");
}

#[test]
fn key_file_wrong_length() {
    let errs = key_errors(&[1; 31], 0o600);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 27, 23, "has 31 bytes; expected exactly 32 raw bytes or 64 hex characters");
}

#[test]
fn good_key_files_pass() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    fs::write(&key, "ab".repeat(32) + "\n").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let text = edit(26, &format!("rpo = \"15m\"\nencryption_key_file = \"{}\"", key.display()));
    let topo = Topology::parse(&text, Path::new("/elsewhere/t.toml")).unwrap();
    assert_eq!(topo.policies["p"].encryption_key_file.as_deref(), Some(key.as_path()));
}

// ---- many errors at once -------------------------------------------------

#[test]
fn every_error_of_a_file_is_reported_in_file_order() {
    let text = r#"
[mesh]
name = "m"
version = 0

[[node]]
name = "a"
id = "ID1"
addresses = ["10.0.0.1:7400"]
site = "s"
colour = "blue"

[[node]]
name = "a"
id = "ID1"
addresses = ["10.0.0.1:7400"]

[[volume]]
name = "v"
source = "nobody"
kind = "file"
device = "/dev/sda"
path = "/img"
targets = []
policy = "gold"

[policy.p]
rpo = "soon"
block_size = "3MiB"
compression = "zstd:99"
"#;
    let errs = errors(text);
    let positions: Vec<(usize, usize)> = errs.iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(
        positions,
        [
            (3, 11),
            (10, 1),
            (12, 1),
            (13, 8),
            (14, 6),
            (15, 14),
            (19, 10),
            (21, 1),
            (23, 11),
            (24, 10),
            (27, 7),
            (28, 14),
            (29, 15)
        ],
        "{errs:#?}"
    );
    assert!(errs[0].2.contains("at least 1"));
    assert!(errs[1].2.contains("unknown key `colour`"));
    assert!(errs[2].2.contains("missing required key `site`"));
    assert!(errs[3].2.contains("duplicate node name"));
    assert!(errs[4].2.contains("duplicate node id"));
    assert!(errs[5].2.contains("duplicate address"));
    assert!(errs[6].2.contains("volume source \"nobody\""));
    assert!(errs[7].2.contains("`device` is a setting of kind \"kmod\""));
    assert!(errs[8].2.contains("`targets` in [[volume]] is empty"));
    assert!(errs[9].2.contains("undefined policy \"gold\""));
    assert!(errs[10].2.contains("bad duration \"soon\""));
    assert!(errs[11].2.contains("not a power of two"));
    assert!(errs[12].2.contains("zstd level 99"));
    let shown = Topology::parse(&expand(text), Path::new("conf/t.toml")).unwrap_err().to_string();
    assert_eq!(shown.lines().count(), errs.len());
    assert!(shown.lines().next().unwrap().starts_with("conf/t.toml:3:11: "), "{shown}");
}

// ---- links ----------------------------------------------------------------

fn with_link(link: &str) -> String {
    edit(26, &format!("rpo = \"15m\"\n[[link]]\n{link}"))
}

#[test]
fn link_between_two_nodes_is_read() {
    let topo = Topology::parse(
        &with_link("nodes = [\"b\", \"a\"]\nlimit = \"50Mbit\"\nwindows = [{ days = \"sat-sun\", from = \"00:00\", to = \"24:00\", limit = \"unlimited\" }]"),
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(topo.links.len(), 1);
    assert!(topo.links[0].joins("a", "b") && topo.links[0].joins("b", "a"));
    assert_eq!(topo.links[0].bandwidth.limit_bps, Some(50_000_000));
    assert_eq!(topo.links[0].bandwidth.windows.len(), 1);
}

#[test]
fn link_to_an_unknown_node() {
    assert_one(&with_link("nodes = [\"a\", \"c\"]\nlimit = \"50Mbit\""), 28, 15, "link node \"c\" is not a [[node]] name");
}

#[test]
fn link_names_one_node_twice() {
    assert_one(&with_link("nodes = [\"a\", \"a\"]\nlimit = \"50Mbit\""), 28, 15, "names \"a\" twice");
}

#[test]
fn link_with_three_nodes() {
    assert_one(&with_link("nodes = [\"a\", \"b\", \"a\"]\nlimit = \"50Mbit\""), 28, 9, "lists 3 names; expected exactly two");
}

#[test]
fn link_without_nodes_or_limit() {
    assert_one(&with_link("limit = \"50Mbit\""), 27, 1, "missing required key `nodes` in [[link]]");
    assert_one(&with_link("nodes = [\"a\", \"b\"]"), 27, 1, "missing required key `limit` in [[link]]");
}

#[test]
fn link_with_a_bad_rate_or_key() {
    assert_one(&with_link("nodes = [\"a\", \"b\"]\nlimit = \"fast\""), 29, 9, "`limit` in [[link]]");
    assert_one(&with_link("nodes = [\"a\", \"b\"]\nlimit = \"1Gbit\"\nmtu = 1500"), 30, 1, "unknown key `mtu` in [[link]]");
}

#[test]
fn second_link_between_the_same_pair() {
    assert_one(
        &with_link("nodes = [\"a\", \"b\"]\nlimit = \"50Mbit\"\n[[link]]\nnodes = [\"b\", \"a\"]\nlimit = \"10Mbit\""),
        31,
        9,
        "already defined on line 28",
    );
}

// ---- volume hooks -------------------------------------------------------

/// `GOOD` with `[volume.hooks]` holding `lines` after the volume (line 24 on).
fn with_hooks(lines: &str) -> String {
    edit(23, &format!("policy = \"p\"\n[volume.hooks]\n{lines}"))
}

#[test]
fn volume_hooks_are_read() {
    let t = Topology::parse(&with_hooks("pre = [\"/usr/local/bin/quiesce\", \"--db\", \"main\"]\npost = [\"/usr/local/bin/resume\"]\ntimeout = \"2m\""), Path::new("t.toml")).unwrap();
    let hooks = t.volumes[0].hooks.clone().unwrap();
    assert_eq!(hooks.pre.unwrap(), vec!["/usr/local/bin/quiesce", "--db", "main"]);
    assert_eq!(hooks.post.unwrap(), vec!["/usr/local/bin/resume"]);
    assert_eq!(hooks.timeout, std::time::Duration::from_secs(120));
    let t = Topology::parse(&with_hooks("post = [\"/bin/sync\"]"), Path::new("t.toml")).unwrap();
    let hooks = t.volumes[0].hooks.clone().unwrap();
    assert_eq!((hooks.pre, hooks.timeout), (None, std::time::Duration::from_secs(60)));
    assert_eq!(Topology::parse(&expand(GOOD), Path::new("t.toml")).unwrap().volumes[0].hooks, None);
}

#[test]
fn bad_volume_hooks() {
    assert_one(&with_hooks("pre = [\"quiesce.sh\"]"), 25, 8, "the program of `pre` in `hooks` of [[volume]] must be an absolute path");
    assert_one(&with_hooks("post = []"), 25, 8, "`post` in `hooks` of [[volume]] is empty");
    assert_one(&with_hooks("pre = \"/bin/true\""), 25, 7, "a list of strings");
    assert_one(&with_hooks("timeout = \"1m\""), 24, 1, "has neither `pre` nor `post`");
    assert_one(&with_hooks("pre = [\"/bin/true\"]\ntimeout = \"2h\""), 26, 11, "`timeout` in `hooks` of [[volume]] must be from 1s to 1h");
    assert_one(&with_hooks("pre = [\"/bin/true\"]\ntimeout = \"soon\""), 26, 11, "`timeout` in `hooks` of [[volume]]");
    assert_one(&with_hooks("pre = [\"/bin/true\"]\nbefore = [\"/bin/true\"]"), 26, 1, "before");
    assert_one(&edit(23, "policy = \"p\"\nhooks = \"/bin/true\""), 24, 9, "a table");
}

// ---- node schedules ------------------------------------------------------

#[test]
fn gc_and_scrub_schedules() {
    let t = Topology::parse(&expand(GOOD), Path::new("t.toml")).unwrap();
    assert_eq!(t.nodes[0].gc_every, Some(std::time::Duration::from_secs(24 * 3600)));
    assert_eq!(t.nodes[0].scrub_every, Some(std::time::Duration::from_secs(7 * 24 * 3600)));
    let t = Topology::parse(&edit(9, "site = \"s\"\ngc_every = \"off\"\nscrub_every = \"12h\""), Path::new("t.toml")).unwrap();
    assert_eq!((t.nodes[0].gc_every, t.nodes[0].scrub_every), (None, Some(std::time::Duration::from_secs(12 * 3600))));
    assert_one(&edit(9, "site = \"s\"\ngc_every = \"0s\""), 10, 12, "`gc_every` in [[node]] is zero; expected a duration such as \"7d\" or \"12h\", or \"off\"");
    assert_one(&edit(9, "site = \"s\"\ngc_every = \"never\""), 10, 12, "`gc_every` in [[node]]:");
    assert_one(&edit(9, "site = \"s\"\ngc_every = 3"), 10, 12, "a string");
}

// ---- node HTTP endpoints -----------------------------------------------------

#[test]
fn metrics_and_status_page_addresses() {
    let t = Topology::parse(&expand(GOOD), Path::new("t.toml")).unwrap();
    assert_eq!((t.nodes[0].metrics, t.nodes[0].status_page), (None, None));
    let t = Topology::parse(&edit(9, "site = \"s\"\nmetrics = \"0.0.0.0:9720\"\nstatus_page = \"[::1]:9721\""), Path::new("t.toml")).unwrap();
    assert_eq!(t.nodes[0].metrics, Some("0.0.0.0:9720".parse().unwrap()));
    assert_eq!(t.nodes[0].status_page, Some("[::1]:9721".parse().unwrap()));
    assert_one(&edit(9, "site = \"s\"\nstatus_page = \"0.0.0.0:9721\""), 10, 15, "`status_page` in [[node]] must be a loopback address");
    assert_one(&edit(9, "site = \"s\"\nmetrics = \"localhost:9720\""), 10, 11, "bad `metrics` in [[node]]: expected an IP socket address");
    assert_one(&edit(9, "site = \"s\"\nmetrics = \"127.0.0.1:0\""), 10, 11, "has port 0");
    assert_one(&edit(9, "site = \"s\"\nstatus_page = 9721"), 10, 15, "a string");
}

// ---- volume free space ---------------------------------------------------

#[test]
fn volume_free_space_is_skip_by_default_read_on_request_and_checked() {
    use drmesh_topology::FreeSpace;
    assert_eq!(Topology::parse(&expand(GOOD), Path::new("t.toml")).unwrap().volumes[0].free_space, FreeSpace::Skip);
    let read = Topology::parse(&edit(23, "policy = \"p\"\nfree_space = \"read\""), Path::new("t.toml")).unwrap();
    assert_eq!(read.volumes[0].free_space, FreeSpace::Read);
    assert_one(&edit(23, "policy = \"p\"\nfree_space = \"zero\""), 24, 14, "`free_space` is \"zero\"; expected \"skip\"");
    assert_one(&edit(23, "policy = \"p\"\nfree_space = false"), 24, 14, "a string");
}

// ---- consistency groups ----------------------------------------------------

/// `GOOD` with a node `c` (lines 27-31), a volume `w` (lines 32-36) with
/// `w_extra` lines after its `policy` (from line 37), and `groups` after that.
fn with_group(w_extra: &str, groups: &str) -> String {
    edit(
        26,
        &format!(
            "rpo = \"15m\"\n[[node]]\nname = \"c\"\nid = \"ID3\"\naddresses = [\"10.0.0.3:7400\"]\nsite = \"s\"\n[[volume]]\nname = \"w\"\nkind = \"file\"\npath = \"/img2\"\npolicy = \"p\"\n{w_extra}\n{groups}"
        ),
    )
}

const W_OF_A: &str = "source = \"a\"\ntargets = [\"b\"]";

#[test]
fn a_group_of_two_volumes_of_one_node_is_read() {
    let topo = Topology::parse(&expand(&with_group(W_OF_A, "[[group]]\nname = \"db-host\"\nvolumes = [\"w\", \"v\"]")), Path::new("t.toml")).unwrap();
    assert_eq!(topo.groups.len(), 1);
    assert_eq!(topo.groups[0].name, "db-host");
    assert_eq!(topo.groups[0].volumes, ["w", "v"]);
    assert_eq!(topo.group_of("v").map(|g| g.name.as_str()), Some("db-host"));
    assert!(topo.group_of("x").is_none());
    assert!(topo.groups[0].hooks.is_none());
    let with = with_group(W_OF_A, "[[group]]\nname = \"db-host\"\nvolumes = [\"w\", \"v\"]\n[group.hooks]\npre = [\"/usr/local/bin/quiesce\", \"db\"]\ntimeout = \"20s\"");
    let topo = Topology::parse(&expand(&with), Path::new("t.toml")).unwrap();
    let hooks = topo.groups[0].hooks.as_ref().expect("the group's hooks");
    assert_eq!((hooks.pre.as_deref(), hooks.timeout), (Some(&["/usr/local/bin/quiesce".to_string(), "db".to_string()][..]), std::time::Duration::from_secs(20)));
    let bad = with.replace("/usr/local/bin/quiesce", "quiesce");
    assert!(errors(&bad).iter().any(|e| e.2.contains("must be an absolute path")), "{:?}", errors(&bad));
}

#[test]
fn a_group_member_that_is_no_volume() {
    // Lines: 37-38 w's source and targets, 39 [[group]], 40 name, 41 volumes.
    assert_one(&with_group(W_OF_A, "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"x\"]"), 41, 17, "lists volume \"x\", which is not a [[volume]] name");
}

#[test]
fn a_group_of_one_volume() {
    assert_one(&with_group(W_OF_A, "[[group]]\nname = \"g\"\nvolumes = [\"v\"]"), 41, 11, "a consistency group has at least two");
}

#[test]
fn a_group_lists_a_volume_twice() {
    assert_one(&with_group(W_OF_A, "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"v\"]"), 41, 17, "listed twice in the group");
}

#[test]
fn a_group_across_two_source_nodes() {
    let errs = errors(&with_group("source = \"b\"\ntargets = [\"c\"]", "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"w\"]"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 41, 17, "is read by node b, volume \"v\" by node a; a group's volumes have one source node");
}

#[test]
fn a_group_whose_volumes_have_other_targets() {
    let errs = errors(&with_group("source = \"a\"\ntargets = [\"b\", \"c\"]", "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"w\"]"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 41, 17, "has targets b, c, volume \"v\" has b; a group's volumes have the same targets");
}

#[test]
fn a_group_member_with_hooks() {
    let errs = errors(&with_group(&format!("{W_OF_A}\n[volume.hooks]\npre = [\"/bin/true\"]"), "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"w\"]"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 43, 17, "has [volume.hooks]; the views of a group are taken together, so its hooks run once for the group: move them to [group.hooks]");
}

#[test]
fn a_volume_in_two_groups_and_a_group_named_twice() {
    let errs = errors(&with_group(W_OF_A, "[[group]]\nname = \"g\"\nvolumes = [\"v\", \"w\"]\n[[group]]\nname = \"g\"\nvolumes = [\"w\", \"v\"]"));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_error(&errs[0], 43, 8, "group \"g\" is already defined on line 40");
    assert_error(&errs[1], 44, 12, "volume \"w\" is in group \"g\" already");
    assert_error(&errs[2], 44, 17, "volume \"v\" is in group \"g\" already");
}

#[test]
fn a_group_with_an_unknown_key_or_a_bad_name() {
    let errs = errors(&with_group(W_OF_A, "[[group]]\nname = \"DB host\"\nvolumes = [\"v\", \"w\"]\nmembers = 2"));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(&errs[0], 40, 8, "group");
    assert!(errs[1].2.contains("members"), "{errs:#?}");
}

// ---- platforms (proxies that share a hypervisor's VMs) ----------------------

/// `GOOD` with a node `c` (lines 27-31), then `platform` from line 32, then a
/// `qemu` volume `vm` whose source is `source` and targets are `targets`.
fn with_platform(platform: &str, source: &str, targets: &str) -> String {
    edit(
        26,
        &format!(
            "rpo = \"15m\"\n[[node]]\nname = \"c\"\nid = \"ID3\"\naddresses = [\"10.0.0.3:7400\"]\nsite = \"s\"\n{platform}\n[[volume]]\nname = \"vm\"\nsource = \"{source}\"\nkind = \"qemu\"\nmonitor = \"/run/vm.qmp\"\nnode = \"disk0\"\nfleece_dir = \"/var/tmp/f\"\ntargets = [{targets}]\npolicy = \"p\""
        ),
    )
}

const HV: &str = "[[platform]]\nname = \"hv\"\nproxies = [\"a\", \"c\"]\nlease = \"20s\"";

#[test]
fn a_platform_volume_is_read_by_any_of_its_proxies() {
    let topo = Topology::parse(&expand(&with_platform(HV, "hv", "\"b\"")), Path::new("t.toml")).unwrap();
    let p = topo.platform("hv").expect("the platform");
    assert_eq!((p.proxies.as_slice(), p.lease), (&["a".to_string(), "c".to_string()][..], std::time::Duration::from_secs(20)));
    let vm = topo.volume_by_name("vm").unwrap();
    assert_eq!(topo.platform_of(vm).map(|p| p.name.as_str()), Some("hv"));
    assert!(topo.may_read(vm, "a") && topo.may_read(vm, "c") && !topo.may_read(vm, "b"));
    assert_eq!(topo.readable_by("c").map(|v| v.name.as_str()).collect::<Vec<_>>(), ["vm"]);
    assert_eq!(topo.readable_by("a").map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v", "vm"]);
    // The lease defaults to 30 s.
    let default = with_platform("[[platform]]\nname = \"hv\"\nproxies = [\"a\"]", "hv", "\"b\"");
    assert_eq!(Topology::parse(&expand(&default), Path::new("t.toml")).unwrap().platforms[0].lease, drmesh_topology::DEFAULT_PLATFORM_LEASE);
}

#[test]
fn a_platform_with_bad_proxies_or_lease() {
    // Lines: 32 [[platform]], 33 name, 34 proxies, 35 lease.
    assert_one(&with_platform("[[platform]]\nname = \"hv\"\nproxies = [\"a\", \"x\"]", "hv", "\"b\""), 34, 17, "proxy \"x\" of platform \"hv\" is not a [[node]] name");
    assert_one(&with_platform("[[platform]]\nname = \"hv\"\nproxies = []", "hv", "\"b\""), 34, 11, "`proxies` in [[platform]] is empty");
    assert_one(&with_platform("[[platform]]\nname = \"hv\"\nproxies = [\"a\", \"a\"]", "hv", "\"b\""), 34, 17, "proxy \"a\" is listed twice");
    assert_one(&with_platform("[[platform]]\nname = \"hv\"\nproxies = [\"a\"]\nlease = \"1s\"", "hv", "\"b\""), 35, 9, "must be from 2s to 10m");
    assert_one(&with_platform("[[platform]]\nname = \"hv\"\nlease = \"5s\"", "hv", "\"b\""), 32, 1, "proxies");
}

#[test]
fn a_platform_named_like_a_node_or_twice() {
    let errs = errors(&with_platform("[[platform]]\nname = \"c\"\nproxies = [\"a\"]\n[[platform]]\nname = \"c\"\nproxies = [\"a\"]", "c", "\"b\""));
    assert!(errs.iter().any(|e| e.0 == 33 && e.2.contains("platform name \"c\" is a [[node]] name too")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.0 == 36 && e.2.contains("platform \"c\" is already defined on line 33")), "{errs:#?}");
}

#[test]
fn a_platform_volume_that_targets_a_proxy_or_is_not_qemu() {
    // Lines: 36 [[volume]] .. 39 kind, 43 targets.
    assert_one(&with_platform(HV, "hv", "\"b\", \"c\""), 43, 17, "target \"c\" is a proxy of platform \"hv\", which reads the volume");
    let file = with_platform(HV, "hv", "\"b\"").replace("kind = \"qemu\"\nmonitor = \"/run/vm.qmp\"\nnode = \"disk0\"\nfleece_dir = \"/var/tmp/f\"", "kind = \"file\"\npath = \"/img9\"");
    let errs = errors(&file);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_error(&errs[0], 38, 10, "is a [[platform]], whose proxies read VM disks through qemu; expected kind \"qemu\", found \"file\"");
    // A source that is neither a node nor a platform says both.
    assert_one(&with_platform(HV, "hx", "\"b\""), 38, 10, "volume source \"hx\" is not a [[node]] or [[platform]] name");
}
