//! Collectives between workers: the data-plane listener, the TCP ring and point-to-point links.
pub mod dataplane;
pub mod fetch;
pub mod link;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use std::io::Read;

/// A ring message of f32 values: an 8-byte little-endian count, then the values, little endian
/// (one copy of the slice, not a push per value: a gradient chunk can be gigabytes). Pipeline
/// links add a wire dtype to the header (`link`).
pub(crate) fn encode_f32s(data: &[f32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(8 + 4 * data.len());
    msg.extend_from_slice(&(data.len() as u64).to_le_bytes());
    #[cfg(target_endian = "little")]
    msg.extend_from_slice(bytemuck::cast_slice(data));
    #[cfg(target_endian = "big")]
    for v in data {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg
}

/// Reads the `n` little-endian f32 values of a message body straight into a vector.
pub(crate) fn read_f32s(r: &mut impl Read, n: usize) -> std::io::Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    r.read_exact(bytemuck::cast_slice_mut(&mut out))?;
    #[cfg(target_endian = "big")]
    for v in &mut out {
        *v = f32::from_bits(u32::from_le(v.to_bits()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn f32_messages_round_trip_little_endian() {
        let data = [1.5f32, -0.0, f32::MAX, 3.25e-20];
        let msg = super::encode_f32s(&data);
        assert_eq!(&msg[..8], &4u64.to_le_bytes());
        assert_eq!(&msg[8..12], &1.5f32.to_le_bytes());
        let back = super::read_f32s(&mut &msg[8..], 4).unwrap();
        assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), data.map(f32::to_bits));
    }
}
