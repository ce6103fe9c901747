//! PVH entry: from QEMU's 32-bit protected-mode hand-off to Rust in long mode.
//!
//! # Theory
//!
//! 1. **How QEMU finds us.** `-kernel` accepts an ELF64 carrying a Xen PVH note (type 18,
//!    `XEN_ELFNOTE_PHYS32_ENTRY`, name "Xen"): its descriptor is the physical address of a
//!    32-bit entry point. QEMU (through SeaBIOS, which first enumerates PCI and assigns BARs)
//!    enters there in flat 32-bit protected mode, paging off, interrupts off, with `ebx`
//!    pointing at an `hvm_start_info` block.
//! 2. **What the trampoline does**, in order: zero `.bss` (the loader does not promise it),
//!    identity-map the low 4 GiB with 2 MiB pages (RAM, ECAM at 0xb000_0000, BARs, the VT-d
//!    unit at 0xfed9_0000 all live there, and KVA == PA is the kernel's whole memory model),
//!    enable PAE, SSE (CR0.EM=0, CR0.MP=1, CR4.OSFXSR and CR4.OSXMMEXCPT; the soft-float
//!    x86_64-unknown-none code uses none, but an SSE instruction from inline assembly would
//!    then run rather than fault with no IDT) and long mode, load a 64-bit GDT, and call `kmain(start_info)` on a
//!    256 KiB stack.
//! 3. **Interrupts stay off for the kernel's life.** Everything polls, so no IDT is needed
//!    and no red zone matters (the target disables it anyway).

use core::arch::global_asm;

// Why 256 KiB of stack: the checks recurse little, but page-table walks and formatting
// nest a few KiB deep; 256 KiB leaves two orders of magnitude of room and costs nothing
// (it is .bss).
global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4                     # name size: "Xen\0"
    .long 8                     # descriptor size
    .long 18                    # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .p2align 2
    .quad pvh_start

    .section .bss.boot, "aw", @nobits
    .p2align 12
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4096 * 4
    .p2align 4
boot_stack: .skip 262144
boot_stack_top:

    .section .rodata.boot, "a"
    .p2align 3
boot_gdt:
    .quad 0                     # null
    .quad 0x00af9a000000ffff    # 0x08: 64-bit code, present, ring 0
    .quad 0x00cf92000000ffff    # 0x10: data, present, writable
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi             # hvm_start_info, kept in esi until kmain
    movl $boot_stack_top, %esp

    # Zero .bss (page tables and stack included).
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    # PML4[0] -> PDPT; PDPT[0..4] -> four page directories.
    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b

    # 2048 2 MiB pages: present | writable | large (0x83); from 3 GiB up (MMIO) also
    # cache-disable | write-through (0x18).
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $1536, %ecx
    jb 3f
    orl $0x18, %eax
3:  movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    # CR4: PAE (bit 5) | OSFXSR (bit 9) | OSXMMEXCPT (bit 10).
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    # EFER.LME (bit 8).
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    # CR0: PG (bit 31) | MP (bit 1) | PE (bit 0), EM (bit 2) cleared.
    movl %cr0, %eax
    orl $0x80000003, %eax
    andl $0xfffffffb, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %esi, %edi             # kmain(start_info: u32)
    call kmain
4:  hlt
    jmp 4b
"#,
    options(att_syntax)
);
