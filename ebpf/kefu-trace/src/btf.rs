//! Just enough of a BTF reader to find one member offset in the running kernel's types
//! (`struct io_kiocb` -> `cqe` -> `fd`), so the io_uring probe can read a request's file
//! descriptor without CO-RE support in the Rust eBPF toolchain.
//!
//! Format (all little-endian on x86_64): a 24-byte header (magic 0xeB9F, version, flags,
//! hdr_len, type_off, type_len, str_off, str_len), then the type section, a sequence of
//! `btf_type { name_off: u32, info: u32, size_or_type: u32 }` each followed by kind-specific
//! data, then the string section. Type ids start at 1 in section order.

use std::collections::HashMap;

/// Why a BTF blob could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF data ends early (needed {needed} bytes at offset {offset})")]
    Incomplete { offset: usize, needed: usize },
    #[error("not BTF: bad magic {0:#x}")]
    BadMagic(u16),
    #[error("unknown BTF kind {kind} at type id {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("struct `{0}` not found")]
    NoStruct(String),
    #[error("member `{member}` not found in `{owner}`")]
    NoMember { owner: String, member: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    name_off: u32,
    kind: u32,
    type_ref: u32,
    members: Vec<Member>,
}

/// The parsed type table: enough to walk struct/union members and typedef/modifier chains.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], offset: usize) -> Result<u32, BtfError> {
    let bytes = data
        .get(offset..offset + 4)
        .ok_or(BtfError::Incomplete { offset, needed: 4 })?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_kernel() -> anyhow::Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .map_err(|e| anyhow::anyhow!("reading /sys/kernel/btf/vmlinux: {e}"))?;
        Ok(Self::parse(&data)?)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic_bytes = data.get(0..2).ok_or(BtfError::Incomplete {
            offset: 0,
            needed: 2,
        })?;
        let magic = u16::from_le_bytes([magic_bytes[0], magic_bytes[1]]);
        if magic != 0xeb9f {
            return Err(BtfError::BadMagic(magic));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings_start = hdr_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .ok_or(BtfError::Incomplete {
                offset: strings_start,
                needed: str_len,
            })?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            type_ref: 0,
            members: Vec::new(),
        }];
        let mut at = types_start;
        while at < types_end {
            let id = types.len() as u32;
            let name_off = u32_at(data, at)?;
            let info = u32_at(data, at + 4)?;
            let size_or_type = u32_at(data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,                    // INT
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                3 => 12,                   // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(data, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(data, m)?,
                            type_id: u32_at(data, m + 4)?,
                            // With kind_flag the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                14 | 17 => 4,         // VAR, DECL_TAG
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                other => return Err(BtfError::UnknownKind { kind: other, id }),
            };
            at += extra;
            types.push(Type {
                name_off,
                kind,
                type_ref: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_string();
                // Keep the first definition with members (forward-declared duplicates are FWD).
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let start = off as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follow typedefs and const/volatile/restrict/type-tag to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(8..=11 | 18) => id = self.types[id as usize].type_ref,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` inside struct `owner`, looking through anonymous struct/union
    /// members (e.g. the `fd` of `struct io_cqe`, which sits in an unnamed union).
    pub fn member_offset(&self, owner: &str, member: &str) -> Result<u64, BtfError> {
        let id = *self
            .structs_by_name
            .get(owner)
            .ok_or_else(|| BtfError::NoStruct(owner.to_string()))?;
        self.find_member(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                owner: owner.to_string(),
                member: member.to_string(),
            })
    }

    /// The struct type id of `owner.member` (for walking nested structs by name).
    pub fn member_struct_name(&self, owner: &str, member: &str) -> Option<String> {
        let id = *self.structs_by_name.get(owner)?;
        let t = self.types.get(id as usize)?;
        let m = t.members.iter().find(|m| self.name(m.name_off) == member)?;
        let target = self.types.get(self.resolve(m.type_id) as usize)?;
        Some(self.name(target.name_off).to_string())
    }

    fn find_member(&self, id: u32, member: &str, base_bits: u64) -> Option<u64> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            let bits = base_bits + u64::from(m.bit_offset);
            if m.name_off != 0 {
                if self.name(m.name_off) == member {
                    return Some(bits);
                }
                continue;
            }
            let inner = self.resolve(m.type_id);
            if matches!(
                self.types.get(inner as usize).map(|t| t.kind),
                Some(KIND_STRUCT | KIND_UNION)
            ) && let Some(found) = self.find_member(inner, member, bits)
            {
                return Some(found);
            }
        }
        None
    }
}

/// Offset of the submitting file descriptor inside `struct io_kiocb` (`req->cqe.fd`), which
/// holds the SQE's fd until the completion overwrites the union with flags.
pub fn io_kiocb_fd_offset(btf: &Btf) -> Result<u64, BtfError> {
    let cqe = btf.member_offset("io_kiocb", "cqe")?;
    let cqe_type = btf
        .member_struct_name("io_kiocb", "cqe")
        .unwrap_or_else(|| "io_cqe".to_string());
    let fd = btf.member_offset(&cqe_type, "fd")?;
    Ok(cqe + fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: struct inner { int a; union { int b; int fd; }; } and
    /// struct outer { long x; struct inner cqe; }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0fd\0outer\0x\0cqe\0long\0".to_vec();
        let off = |s: &str| {
            let needle = [s.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .enumerate()
                .find(|(i, w)| *w == needle.as_slice() && strings[i - 1] == 0)
                .map(|(i, _)| i as u32)
                .unwrap()
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (INT, size 4, encoding word)
        push(&[off("int"), 1 << 24, 4, 32]);
        // 2: anonymous union { int b; int fd; } size 4
        push(&[0, (5 << 24) | 2, 4, off("b"), 1, 0, off("fd"), 1, 0]);
        // 3: struct inner { int a @0; union @32 bits } size 8
        push(&[off("inner"), (4 << 24) | 2, 8, off("a"), 1, 0, 0, 2, 32]);
        // 4: long
        push(&[off("long"), 1 << 24, 8, 64]);
        // 5: struct outer { long x @0; struct inner cqe @64 bits } size 16
        push(&[
            off("outer"),
            (4 << 24) | 2,
            16,
            off("x"),
            4,
            0,
            off("cqe"),
            3,
            64,
        ]);
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.push(1);
        out.push(0);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "cqe").unwrap(), 8);
        assert_eq!(btf.member_offset("inner", "fd").unwrap(), 4);
        assert_eq!(
            btf.member_struct_name("outer", "cqe").as_deref(),
            Some("inner")
        );
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn truncated_and_foreign_data_are_errors_not_panics() {
        let blob = sample();
        for len in 0..blob.len() {
            let _ = Btf::parse(&blob[..len]);
        }
        assert!(matches!(
            Btf::parse(b"\x7fELF...."),
            Err(BtfError::BadMagic(_))
        ));
    }

    #[test]
    fn running_kernel_has_io_kiocb_fd() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this kernel");
            return;
        };
        let off = io_kiocb_fd_offset(&btf).unwrap();
        assert!(off > 0 && off < 4096, "offset {off}");
    }
}
