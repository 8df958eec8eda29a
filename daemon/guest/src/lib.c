/* String and formatting helpers (the kernel's lib/). The mem and str primitives are notrace, as in Linux. */
#include "kernel.h"

notrace void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

notrace void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;

	while (n--)
		*d++ = (u8)c;
	return dst;
}

notrace size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

notrace int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (int)(u8)*a - (int)(u8)*b;
}

struct outbuf {
	char *buf;
	size_t size;
	size_t len;
};

static void out_char(struct outbuf *o, char ch)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = ch;
	o->len++;
}

static void out_number(struct outbuf *o, u64 v, unsigned base, int negative, int width, char pad)
{
	char tmp[24];
	int n = 0;

	do {
		u64 digit = v % base;

		tmp[n++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
		v /= base;
	} while (v);
	if (negative)
		tmp[n++] = '-';
	while (width-- > n)
		out_char(o, pad);
	while (n)
		out_char(o, tmp[--n]);
}

/* A subset of the kernel's vsnprintf: %s %c %d %i %u %x %p %%, with l/ll, field width and '0' padding. */
int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap)
{
	struct outbuf o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		int longs = 0, width = 0;
		char pad = ' ';

		if (*fmt != '%') {
			out_char(&o, *fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0')
			pad = '0';
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);

			for (int n = (int)strlen(s); width-- > n;)
				out_char(&o, ' ');
			while (*s)
				out_char(&o, *s++);
			break;
		}
		case 'c':
			out_char(&o, (char)__builtin_va_arg(ap, int));
			break;
		case 'd':
		case 'i': {
			s64 v = longs ? __builtin_va_arg(ap, s64) : __builtin_va_arg(ap, int);

			out_number(&o, v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
			out_number(&o, longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned), 10, 0, width, pad);
			break;
		case 'x':
			out_number(&o, longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned), 16, 0, width, pad);
			break;
		case 'p':
			out_char(&o, '0');
			out_char(&o, 'x');
			out_number(&o, (u64)__builtin_va_arg(ap, void *), 16, 0, 16, '0');
			break;
		case '%':
			out_char(&o, '%');
			break;
		default:
			out_char(&o, '%');
			out_char(&o, *fmt);
		}
	}
	if (o.size)
		o.buf[o.len < o.size ? o.len : o.size - 1] = '\0';
	return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	__builtin_va_list ap;
	int n;

	__builtin_va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	__builtin_va_end(ap);
	return n;
}

/* Like the kernel's seq_printf: append to m->buf, and on overflow mark the buffer full (count = size). */
int seq_printf(struct seq_file *m, const char *fmt, ...)
{
	__builtin_va_list ap;
	int n;

	if (m->count >= m->size)
		return -1;
	__builtin_va_start(ap, fmt);
	n = vsnprintf(m->buf + m->count, m->size - m->count, fmt, ap);
	__builtin_va_end(ap);
	if (m->count + (size_t)n >= m->size) {
		m->count = m->size;
		return -1;
	}
	m->count += (size_t)n;
	return 0;
}
