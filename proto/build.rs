//! Compiles the .proto files with protox (pure Rust), so that building needs
//! no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "kms/v2/api.proto",
        "edgekms/admin/v1/admin.proto",
        "edgekms/fleet/v1/fleet.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
