fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/musicfs/meta.proto",
        "proto/musicfs/raft.proto",
        "proto/musicfs/storage.proto",
        "proto/musicfs/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // protox compiles the .proto files in Rust, so no system protoc is needed.
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
