//! Generates the gRPC code from `proto/swarm/v1/swarm.proto` with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["swarm/v1/swarm.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
