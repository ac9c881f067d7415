/*
 * Baton's built-in guest: a flat 64-bit image, entered directly in long mode.
 *
 * The VMM loads this image at 0x10000, builds identity page tables, a GDT and
 * a boot-info block at 0x500 (see vmm/boot.py), and starts vCPU 0 at
 * bsp_entry and every other vCPU at ap_entry, each with its own stack.
 *
 * vCPU 0 sets up an IDT, the 8259 PIC (IRQ4, the UART, and IRQ5, the NIC,
 * unmasked), the UART, the NIC's ring, and its x2APIC timer (periodic, period
 * from the boot info). It fills
 * one dword in each 4 KiB page of RAM[0x200000, 0x300000) with a known
 * pattern, once, and then idles with HLT. For every timer tick it prints
 *
 *     baton-guest seq=<n> ticks=<t> ram=<8 hex digits> rx=<r> tx=<x>
 *
 * n (in guest RAM) starts at 0 and rises by one per line; t counts timer
 * interrupts; ram is a checksum over the patterned dwords, constant for the
 * guest's life; r and x count the frames the NIC received and sent back.
 *
 * The NIC is Baton's paravirtual one (vmm/devices/net.py), ring layout 2: 64
 * RX slots at NET_AREA and a ring of TX descriptors, indices in RAM. For each
 * received frame the interrupt handler swaps the source and destination MAC
 * in place and posts the slot as a TX descriptor; one doorbell OUT per batch
 * sends them all and frees the slots (the device sends before the OUT
 * completes), so every frame is echoed with its payload intact, and a batch
 * costs one exit, not one per frame. Console input is collected into lines; a complete line is
 * echoed ("baton-guest echo <line>") and run as a command:
 *
 *     w<d> <text>   write <text> to disk sector <d> (0-9)
 *     r<d>          read disk sector <d>
 *     f             flush the disk
 *     reboot        ask for a reset through the i8042 (port 0x64, 0xfe)
 *
 * The disk is Baton's paravirtual block device: write the guest-physical
 * address of a request (layout at BLK_REQ below) to port 0x6000 as a 32-bit
 * OUT; the device completes it before the OUT returns and writes status.
 * Other vCPUs only count their own timer ticks (ap_ticks).
 *
 * Work per tick: a few thousand instructions (the nested KVM this is tested
 * on emulates about a million guest instructions per second).
 */
    .intel_syntax noprefix
    .code64

    .set COM1,          0x3f8
    .set BOOTINFO,      0x500
    .set BI_NCPUS,      BOOTINFO + 8
    .set BI_TMICT,      BOOTINFO + 12
    .set BI_TDCR,       BOOTINFO + 16
    .set BLK_PORT,      0x6000
    .set BLK_REQ,       0x100000        /* struct below, 40 bytes */
    .set BLK_OP,        BLK_REQ + 0     /* u32: 1 read, 2 write, 3 flush, 4 identify */
    .set BLK_STATUS,    BLK_REQ + 4     /* u32: 0 ok, 1 io error, 2 bad request */
    .set BLK_SECTOR,    BLK_REQ + 8     /* u64 */
    .set BLK_COUNT,     BLK_REQ + 16    /* u32 sectors of 512 bytes */
    .set BLK_BUFFER,    BLK_REQ + 24    /* u64 guest-physical address */
    .set BLK_BUF,       0x101000        /* one sector of data */
    .set NET_PORT,      0x6010          /* +0 ring area, +4 send, +8 ack, +12 doorbell */
    .set NET_AREA,      0x120000        /* 4 KiB of indices, then 64 slots */
    .set NET_LAYOUT2,   1               /* AREA bit 0: ring layout 2 */
    .set NET_RX_HEAD,   NET_AREA + 0    /* u32, written by the device */
    .set NET_RX_TAIL,   NET_AREA + 4    /* u32, written by the doorbell */
    .set NET_TX_HEAD,   NET_AREA + 0x10 /* u32, written here: descriptors posted */
    .set NET_TX_OK,     NET_AREA + 0x18 /* u32, written by the device: frames sent */
    .set NET_TX_DESC,   NET_AREA + 0x100 /* u32 slot addresses */
    .set NET_SLOTS,     64
    .set NET_TX_SLOTS,  64
    .set NET_SLOT_BASE, 0x1000          /* slot: u32 len, u32 status, frame */
    .set NET_VEC,       0x25            /* PIC master base 0x20 + IRQ5 */
    .set CSUM_BASE,     0x200000
    .set CSUM_PAGES,    256
    .set TIMER_VEC,     0x40
    .set SERIAL_VEC,    0x24            /* PIC master base 0x20 + IRQ4 */
    .set SPURIOUS_VEC,  0xff
    .set MSR_APIC_BASE, 0x1b
    .set X2APIC_ID,     0x802
    .set X2APIC_EOI,    0x80b
    .set X2APIC_SPIV,   0x80f
    .set X2APIC_LVTT,   0x832
    .set X2APIC_TMICT,  0x838
    .set X2APIC_TDCR,   0x83e
    .set LINE_MAX,      64

    .section .text
    .globl _start
_start:
header:
    .ascii "BATONGST"
    .long 1                         /* header version */
    .long bsp_entry - header
    .long ap_entry - header
    .long _end - header             /* bytes in memory, .bss included */

/* ------------------------------------------------------------------ vCPU 0 */
bsp_entry:
    cli
    call setup_idt
    lidt [idtr]
    mov dword ptr [idt_ready], 1
    call init_pic
    call init_uart
    call init_net
    call fill_pattern
    call start_timer
    lea rsi, [msg_boot]
    call puts
    mov eax, [BI_NCPUS]
    call put_dec
    mov al, 10
    call putc

main_loop:
    cli
    mov rax, [ticks]
    cmp rax, [printed_ticks]
    jne 1f
    mov eax, [in_head]
    cmp eax, [in_tail]
    jne 2f
    sti                             /* sti; hlt: no tick can slip in between */
    hlt
    jmp main_loop
1:  sti
    mov [printed_ticks], rax
    call heartbeat
    jmp main_loop
2:  sti
    call drain_input
    jmp main_loop

/* ------------------------------------------------------------ other vCPUs */
ap_entry:
    cli
1:  cmp dword ptr [idt_ready], 0
    jne 2f
    pause
    jmp 1b
2:  lidt [idtr]
    call start_timer
    sti
3:  hlt
    jmp 3b

/* ---------------------------------------------------------------- set-up */
setup_idt:
    lea rdi, [idt]
    xor ecx, ecx
1:  lea rax, [exception_isr]
    cmp ecx, 32
    jb 2f
    lea rax, [spurious_isr]
2:  call set_gate
    add rdi, 16
    inc ecx
    cmp ecx, 256
    jb 1b
    lea rdi, [idt + TIMER_VEC * 16]
    lea rax, [timer_isr]
    call set_gate
    lea rdi, [idt + SERIAL_VEC * 16]
    lea rax, [serial_isr]
    call set_gate
    lea rdi, [idt + NET_VEC * 16]
    lea rax, [net_isr]
    call set_gate
    ret

/* rdi: gate, rax: handler. 64-bit interrupt gate, selector 0x08, DPL 0. */
set_gate:
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8e00
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    ret

init_pic:
    mov al, 0x11                    /* ICW1: edge, cascade, ICW4 */
    out 0x20, al
    out 0xa0, al
    mov al, 0x20                    /* ICW2: vector bases */
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 0x04                    /* ICW3: slave on IRQ2 */
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01                    /* ICW4: 8086 mode */
    out 0x21, al
    out 0xa1, al
    mov al, 0xcf                    /* only IRQ4 (COM1) and IRQ5 (NIC) */
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    ret

init_uart:
    mov dx, COM1 + 3
    mov al, 0x03                    /* 8N1 */
    out dx, al
    mov dx, COM1 + 2
    mov al, 0x07                    /* FIFO on, clear both */
    out dx, al
    mov dx, COM1 + 4
    mov al, 0x08                    /* OUT2: route the interrupt to the PIC */
    out dx, al
    mov dx, COM1 + 1
    mov al, 0x01                    /* interrupt on received data */
    out dx, al
    ret

/* The NIC's ring (indices zero: the boot area is zeroed). No NIC: ignored. */
init_net:
    mov dx, NET_PORT
    mov eax, NET_AREA | NET_LAYOUT2
    out dx, eax
    ret

/* The patterned dwords: written once, here, and never again. */
fill_pattern:
    mov rdi, CSUM_BASE
    xor ecx, ecx
1:  mov eax, ecx
    imul eax, eax, 0x9e3779b1
    xor eax, 0xba7c0de5
    mov [rdi], eax
    add rdi, 4096
    inc ecx
    cmp ecx, CSUM_PAGES
    jb 1b
    ret

/* x2APIC on, software-enabled, periodic timer from the boot info. */
start_timer:
    mov ecx, MSR_APIC_BASE
    rdmsr
    or eax, (1 << 11) | (1 << 10)
    wrmsr
    mov ecx, X2APIC_SPIV
    mov eax, 0x100 | SPURIOUS_VEC
    xor edx, edx
    wrmsr
    mov ecx, X2APIC_TDCR
    mov eax, [BI_TDCR]
    wrmsr
    mov ecx, X2APIC_LVTT
    mov eax, (1 << 17) | TIMER_VEC
    wrmsr
    mov ecx, X2APIC_TMICT
    mov eax, [BI_TMICT]
    wrmsr
    ret

/* ---------------------------------------------------------------- ticks */
heartbeat:
    lea rsi, [msg_seq]
    call puts
    mov rax, [seq]
    call put_dec
    lea rsi, [msg_ticks]
    call puts
    mov rax, [printed_ticks]
    call put_dec
    lea rsi, [msg_ram]
    call puts
    call checksum
    call put_hex8
    lea rsi, [msg_rx]
    call puts
    mov rax, [net_rx]
    call put_dec
    lea rsi, [msg_tx]
    call puts
    mov rax, [net_tx]
    call put_dec
    mov al, 10
    call putc
    inc qword ptr [seq]
    ret

/* eax = rotl5-xor over one dword per page of the patterned region. */
checksum:
    mov rsi, CSUM_BASE
    mov ecx, CSUM_PAGES
    xor eax, eax
1:  rol eax, 5
    xor eax, [rsi]
    add rsi, 4096
    dec ecx
    jnz 1b
    ret

/* ---------------------------------------------------------------- console */
/* Move bytes from the interrupt ring into the line; run complete lines. */
drain_input:
1:  mov eax, [in_tail]
    cmp eax, [in_head]
    je 9f
    movzx edx, byte ptr [in_ring + rax]
    inc eax
    and eax, 255
    mov [in_tail], eax
    cmp dl, 13
    je 2f
    cmp dl, 10
    je 2f
    mov ecx, [line_len]
    cmp ecx, LINE_MAX
    jae 1b                          /* overlong: keep the first LINE_MAX bytes */
    mov byte ptr [line + rcx], dl
    inc ecx
    mov [line_len], ecx
    jmp 1b
2:  cmp dword ptr [line_len], 0
    je 1b
    call run_line
    mov dword ptr [line_len], 0
    jmp 1b
9:  ret

run_line:
    lea rsi, [msg_echo]
    call puts
    lea rsi, [line]
    mov ecx, [line_len]
    call putn
    mov al, 10
    call putc
    mov ecx, [line_len]
    movzx eax, byte ptr [line]
    cmp eax, 'f'
    jne 1f
    cmp ecx, 1
    je cmd_flush
1:  cmp ecx, 2
    jb 3f
    movzx edx, byte ptr [line + 1]
    sub edx, '0'
    cmp edx, 9
    ja 2f
    cmp eax, 'w'
    je cmd_write
    cmp eax, 'r'
    je cmd_read
2:  cmp ecx, 6
    jne 3f
    cmp dword ptr [line], 0x6f626572        /* "rebo" */
    jne 3f
    cmp word ptr [line + 4], 0x746f         /* "ot" */
    jne 3f
    mov al, 0xfe                            /* i8042: pulse reset */
    out 0x64, al
4:  cli
    hlt
    jmp 4b
3:  lea rsi, [msg_unknown]
    jmp puts

/* edx = sector. Text after "wN " (or "wN") fills the sector, zero padded. */
cmd_write:
    mov r8d, edx
    lea rdi, [BLK_BUF]
    xor eax, eax
    mov ecx, 64
    rep stosq
    mov ecx, [line_len]
    sub ecx, 3
    jle 1f
    lea rsi, [line + 3]
    lea rdi, [BLK_BUF]
    rep movsb
1:  mov eax, 2
    call blk_request
    lea rsi, [msg_write]
    jmp blk_report

cmd_read:
    mov r8d, edx
    mov eax, 1
    call blk_request
    lea rsi, [msg_read]
    call blk_report_nonl
    lea rsi, [msg_data]
    call puts
    lea rsi, [BLK_BUF]
    mov ecx, LINE_MAX
1:  lodsb
    test al, al
    jz 2f
    cmp al, 32
    jb 3f
    cmp al, 126
    jbe 4f
3:  mov al, '.'
4:  push rcx
    push rsi
    call putc
    pop rsi
    pop rcx
    dec ecx
    jnz 1b
2:  mov al, 10
    jmp putc

cmd_flush:
    xor r8d, r8d
    mov eax, 3
    call blk_request
    lea rsi, [msg_flush]
    jmp blk_report

/* eax = op, r8 = sector: one request of one sector, completed synchronously. */
blk_request:
    mov dword ptr [BLK_OP], eax
    mov dword ptr [BLK_STATUS], 0xffff
    mov qword ptr [BLK_SECTOR], r8
    mov dword ptr [BLK_COUNT], 1
    mov qword ptr [BLK_BUFFER], BLK_BUF
    mov dx, BLK_PORT
    mov eax, BLK_REQ
    out dx, eax
    ret

/* rsi = "baton-guest disk <op>", r8 = sector; prints " sector=N status=S\n". */
blk_report:
    call blk_report_nonl
    mov al, 10
    jmp putc
blk_report_nonl:
    call puts
    lea rsi, [msg_sector]
    call puts
    mov eax, r8d
    call put_dec
    lea rsi, [msg_status]
    call puts
    mov eax, [BLK_STATUS]
    jmp put_dec

/* --------------------------------------------------------------- output */
putc:
    mov dx, COM1
    out dx, al
    ret

/* rsi = NUL-terminated string */
puts:
    mov dx, COM1
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

/* rsi = bytes, ecx = count */
putn:
    mov dx, COM1
    test ecx, ecx
    jz 2f
1:  lodsb
    out dx, al
    dec ecx
    jnz 1b
2:  ret

/* rax = unsigned value, in decimal */
put_dec:
    lea rdi, [numbuf + 24]
    mov rcx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz 1b
    mov rsi, rdi
    lea rcx, [numbuf + 24]
    sub rcx, rdi
    jmp putn

/* eax = value, as 8 lowercase hex digits */
put_hex8:
    mov r9d, eax
    mov r10d, 8
1:  rol r9d, 4
    mov eax, r9d
    and eax, 15
    movzx eax, byte ptr [hexdigits + rax]
    call putc
    dec r10d
    jnz 1b
    ret

/* ------------------------------------------------------------ interrupts */
timer_isr:
    push rax
    push rcx
    push rdx
    mov ecx, X2APIC_ID
    rdmsr
    test eax, eax
    jnz 1f
    inc qword ptr [ticks]
    jmp 2f
1:  lock inc qword ptr [ap_ticks]
2:  mov ecx, X2APIC_EOI
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq

/* Received bytes go into a 256-byte ring; the main loop makes lines of them. */
serial_isr:
    push rax
    push rcx
    push rdx
1:  mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz 2f
    mov dx, COM1
    in al, dx
    mov ecx, [in_head]
    mov edx, ecx
    inc edx
    and edx, 255
    cmp edx, [in_tail]
    je 1b                           /* ring full: drop the byte */
    mov byte ptr [in_ring + rcx], al
    mov [in_head], edx
    jmp 1b
2:  mov al, 0x20                    /* PIC EOI */
    out 0x20, al
    pop rdx
    pop rcx
    pop rax
    iretq

/* Echo every received frame: per slot from tail to head swap the MACs and
 * post the slot as a TX descriptor; ring the doorbell with the new tail (the
 * device sends them, frees the slots, lowers the line); count; look again.
 * About 20 instructions a frame, one exit a batch. */
net_isr:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
1:  mov eax, [NET_RX_TAIL]
    mov ecx, [NET_RX_HEAD]
    cmp eax, ecx
    je 3f
    mov ebx, [NET_TX_HEAD]
    mov edi, ecx
    sub edi, eax                    /* frames in this batch */
    add [net_rx], rdi
2:  mov esi, eax
    and esi, NET_SLOTS - 1
    shl esi, 11                     /* 2048-byte slots */
    add esi, NET_AREA + NET_SLOT_BASE
    mov r8d, [rsi + 8]              /* destination MAC, bytes 0-3 */
    mov r9d, [rsi + 14]             /* source MAC, bytes 0-3 */
    mov [rsi + 8], r9d
    mov [rsi + 14], r8d
    mov r8w, [rsi + 12]             /* bytes 4-5 */
    mov r9w, [rsi + 18]
    mov [rsi + 12], r9w
    mov [rsi + 18], r8w
    mov edi, ebx
    and edi, NET_TX_SLOTS - 1
    mov [NET_TX_DESC + rdi * 4], esi
    inc ebx
    inc eax
    cmp eax, ecx
    jne 2b
    mov [NET_TX_HEAD], ebx
    mov dx, NET_PORT + 12
    out dx, eax                     /* doorbell: sent when the OUT completes */
    mov eax, [NET_TX_OK]
    mov ecx, eax
    sub eax, [net_tx_ok]            /* sent since the last doorbell (u32 wrap) */
    mov [net_tx_ok], ecx
    add [net_tx], rax
    jmp 1b
3:  mov al, 0x20                    /* PIC EOI */
    out 0x20, al
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    iretq

spurious_isr:
    iretq

exception_isr:
    lea rsi, [msg_fault]
    call puts
1:  cli
    hlt
    jmp 1b

/* ------------------------------------------------------------------ data */
    .section .rodata
msg_boot:    .asciz "baton-guest boot cpus="
msg_seq:     .asciz "baton-guest seq="
msg_ticks:   .asciz " ticks="
msg_ram:     .asciz " ram="
msg_rx:      .asciz " rx="
msg_tx:      .asciz " tx="
msg_echo:    .asciz "baton-guest echo "
msg_unknown: .asciz "baton-guest unknown command\n"
msg_write:   .asciz "baton-guest disk write"
msg_read:    .asciz "baton-guest disk read"
msg_flush:   .asciz "baton-guest disk flush"
msg_sector:  .asciz " sector="
msg_status:  .asciz " status="
msg_data:    .asciz " data="
msg_fault:   .asciz "baton-guest fault\n"
hexdigits:   .ascii "0123456789abcdef"

    .balign 8
idtr:
    .word 256 * 16 - 1
    .quad idt

    .section .bss
    .balign 4096
idt:            .skip 256 * 16
seq:            .skip 8
ticks:          .skip 8
printed_ticks:  .skip 8
ap_ticks:       .skip 8
net_rx:         .skip 8
net_tx:         .skip 8
net_tx_ok:      .skip 4
idt_ready:      .skip 4
in_head:        .skip 4
in_tail:        .skip 4
line_len:       .skip 4
in_ring:        .skip 256
line:           .skip LINE_MAX
numbuf:         .skip 24
